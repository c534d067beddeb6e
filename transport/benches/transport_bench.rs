//! Loopback throughput and latency of the transport, printed as a table.
//!
//! Moves `--size` bytes (default 4 GiB) of guest memory between two QUIC
//! endpoints in one process, over 127.0.0.1, and compares in the same run,
//! for 1 and 4 streams:
//!
//! - raw quinn: plain streams, no framing, sending one hot 1 MiB buffer,
//!   on the same connection as the page rows (send window following the
//!   path) and on one whose send window stays at its 64 MiB ceiling, which
//!   can suit a hot buffer better; ratios are taken to the faster of the
//!   two;
//! - raw quinn, memory views: the same, sending views (no copy) of a
//!   memory-sized buffer;
//! - raw quinn + receiver copy: memory views sent, the receiver writes
//!   what arrives into guest memory (the least any transfer into guest
//!   memory does);
//! - raw quinn + memory copies: the sender copies pages out of guest
//!   memory into its send buffers, the receiver into guest memory (what a
//!   migration of a running guest must do: the ceiling for a page
//!   protocol);
//! - the page protocol (sessions + driver), random pages, zstd off.
//!
//! Then, with 4 streams, the page protocol with zstd on for random pages,
//! off/on for compressible pages, and zero-only memory. The page rows set
//! compression as the daemon does: zstd and XOR deltas together, or
//! neither. CPU is getrusage of the whole process (both ends). Last it
//! times `--requests` post-copy page requests of one 4 KiB page each.
//!
//! Guest memory is a 256 MiB buffer seen through a layout of `--size`:
//! page i is buffer page i mod 65536, on both ends.
//!
//! Run: `cargo bench -p transport --bench transport_bench -- --size 1G`

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use transport::driver::{DestEvent, DestinationDriver, SourceDriver};
use transport::endpoint::{Endpoint, EndpointConfig, MigrationId, PeerConnection};
use transport::identity::{ClusterCa, HostName, Validity};
use transport::layout::{MemoryLayout, PageIndex, PageRange, PAGE_SIZE};
use transport::limiter::RateLimiter;
use transport::session::{
    Compression, DestOptions, DestinationSession, PageSink, SourceOptions, SourceSession,
};
use transport::testing::{MemPages, Rng};

const GIB: f64 = (1u64 << 30) as f64;
const BUFFER_PAGES: usize = 65536; // 256 MiB

#[derive(Parser, Debug)]
#[command(about = "transport loopback benchmark")]
struct Args {
    /// Bytes to move per row (suffixes K, M, G).
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    size: u64,
    /// Post-copy single-page requests to time.
    #[arg(long, default_value_t = 10_000)]
    requests: u32,
    /// Initial (and maximum) UDP payload size.
    #[arg(long, default_value_t = transport::endpoint::MAX_GSO_SAFE_MTU)]
    mtu: u16,
    /// Pages per batch frame.
    #[arg(long, default_value_t = 128)]
    batch_pages: usize,
    /// Only the raw-quinn vs page-protocol comparison rows (1 and 4
    /// streams, random pages, no zstd) and no post-copy timing: quicker, and
    /// a profile of it shows only the bulk path.
    #[arg(long)]
    compare_only: bool,
    /// Only this stream count in the comparison rows (1 or 4; default both).
    #[arg(long)]
    streams: Option<u16>,
    /// Only the page-protocol rows, no raw quinn (for profiling them).
    #[arg(long)]
    pages_only: bool,
    /// QUIC send window in MiB (default: the endpoint's).
    #[arg(long)]
    send_window_mib: Option<u64>,
    /// Floor of the autotuned QUIC send window in MiB (default: the
    /// endpoint's; equal to --send-window-mib for a fixed window).
    #[arg(long)]
    min_send_window_mib: Option<u64>,
    /// QUIC per-stream receive window in MiB (default: the endpoint's).
    #[arg(long)]
    stream_window_mib: Option<u32>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|e| format!("bad size {s:?}: {e}"))?;
    let bytes = n.checked_mul(mult).ok_or("size overflows")?;
    if bytes < (1 << 20) || bytes % PAGE_SIZE as u64 != 0 {
        return Err("size must be at least 1M and whole pages".into());
    }
    Ok(bytes)
}

/// Where page `index` lives in a guest buffer of [`BUFFER_PAGES`] pages,
/// which repeats over the whole layout.
fn offset(index: PageIndex) -> usize {
    (index.0 as usize % BUFFER_PAGES) * PAGE_SIZE
}

/// Guest memory: a buffer that repeats over the whole layout, taking byte
/// ranges like a mapped memfd.
fn guest_memory(buf: Vec<u8>) -> MemPages {
    MemPages::repeating(buf).taking_bytes()
}

#[derive(Clone, Copy, Debug)]
enum Content {
    Random,
    Compressible,
    Zero,
}

fn memory(content: Content) -> MemPages {
    // Every page touched, as in a running guest (a fresh zeroed allocation
    // would fault in pages during the measurement).
    let mut buf = vec![1u8; BUFFER_PAGES * PAGE_SIZE];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut rand = move || rng.next();
    match content {
        Content::Random => buf.chunks_exact_mut(8).for_each(|c| {
            c.copy_from_slice(&rand().to_le_bytes());
        }),
        Content::Compressible => {
            // Like a heap page: some random words, much repeated text.
            const TEXT: &[u8] = b"struct page { flags, mapping, index, private }; ";
            for (p, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
                for (i, b) in page.iter_mut().enumerate() {
                    *b = TEXT[(i + p) % TEXT.len()];
                }
                for w in page[..512].chunks_exact_mut(8) {
                    w.copy_from_slice(&rand().to_le_bytes());
                }
            }
        }
        Content::Zero => buf.fill(0),
    }
    guest_memory(buf)
}

/// CPU seconds (user + system) and minor page faults of the whole process.
fn cpu_seconds() -> (f64, i64) {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    (
        tv(usage.user_time()) + tv(usage.system_time()),
        usage.minor_page_faults(),
    )
}

fn since(start: (f64, i64)) -> (f64, i64) {
    let now = cpu_seconds();
    (now.0 - start.0, now.1 - start.1)
}

struct Row {
    name: String,
    streams: u16,
    bytes: u64,
    wall: Duration,
    cpu: (f64, i64),
    note: String,
}

impl Row {
    fn gib_s(&self) -> f64 {
        self.bytes as f64 / GIB / self.wall.as_secs_f64()
    }
    fn cpu_per_gib(&self) -> f64 {
        self.cpu.0 / (self.bytes as f64 / GIB)
    }
    fn faults_per_gib(&self) -> f64 {
        self.cpu.1 as f64 / (self.bytes as f64 / GIB)
    }
}

struct Pair {
    src: PeerConnection,
    dst: PeerConnection,
    _endpoints: [Endpoint; 2],
    next_id: u128,
}

impl Pair {
    /// `fixed_window`: the send window stays at its ceiling (quinn's own
    /// setting) instead of following the path.
    async fn new(args: &Args, fixed_window: bool) -> anyhow::Result<Self> {
        let mtu = args.mtu;
        let ca = ClusterCa::generate("bench").context("generating ca")?;
        let validity = Validity::for_duration(Duration::from_secs(3600));
        let mut config = EndpointConfig::listening_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        config.initial_mtu = mtu;
        config.max_mtu = mtu;
        config.guaranteed_mtu = mtu;
        if let Some(w) = args.send_window_mib {
            config.send_window = w << 20;
        }
        if let Some(w) = args.min_send_window_mib {
            config.min_send_window = w << 20;
        }
        if fixed_window {
            config.min_send_window = config.send_window;
        }
        if let Some(w) = args.stream_window_mib {
            config.stream_receive_window = w << 20;
        }
        let name = |n: &str| HostName::new(n).context("host name");
        let a = Endpoint::bind(&config, &ca.host_identity(&name("src")?, validity)?)
            .context("binding source")?;
        let b = Endpoint::bind(&config, &ca.host_identity(&name("dst")?, validity)?)
            .context("binding destination")?;
        let server = b.clone();
        let accepted = tokio::spawn(async move { server.accept().await });
        let src = a
            .connect(b.local_addr()?, &name("dst")?)
            .await
            .context("connecting")?;
        let dst = accepted
            .await?
            .context("endpoint closed")?
            .context("accepting")?;
        Ok(Self {
            src,
            dst,
            _endpoints: [a, b],
            next_id: 0,
        })
    }

    async fn streams(
        &mut self,
        n: u16,
    ) -> anyhow::Result<(
        transport::endpoint::SourceStreams,
        transport::endpoint::DestinationStreams,
    )> {
        self.next_id += 1;
        let (s, d) = tokio::join!(
            self.src.open_migration(MigrationId(self.next_id), n),
            self.dst.accept_migration()
        );
        Ok((
            s.context("opening streams")?,
            d.context("accepting streams")?,
        ))
    }
}

/// Plain quinn streams, no framing, no sessions. `from_memory` false: the
/// same hot 1 MiB buffer over and over (quinn's own ceiling); true: 1 MiB
/// views, no copy, walking a 256 MiB buffer of random bytes, so what quinn
/// encrypts comes from memory as in a migration. The receiver drops what
/// it reads.
async fn raw(pair: &mut Pair, streams: u16, size: u64, from_memory: bool) -> anyhow::Result<Row> {
    const CHUNK: usize = 1 << 20;
    let (src, dst) = pair.streams(streams).await?;
    let buffer = if from_memory {
        Bytes::from(memory(Content::Random).0)
    } else {
        Bytes::from(vec![0x5Au8; CHUNK])
    };
    let per_stream = size / u64::from(streams);
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut tx) in src.bulk.into_iter().enumerate() {
        let buffer = buffer.clone();
        tasks.spawn(async move {
            let mut left = per_stream;
            // Streams start at different places, as their pages differ.
            let mut at = (i as u64 * per_stream % buffer.len() as u64) as usize;
            while left > 0 {
                if at == buffer.len() {
                    at = 0;
                }
                let n = left.min(CHUNK.min(buffer.len() - at) as u64) as usize;
                tx.write_chunk(buffer.slice(at..at + n)).await?;
                at += n;
                left -= n as u64;
            }
            tx.finish()?;
            // Keep the stream until the peer has it all.
            let _ = tx.stopped().await;
            anyhow::Ok(0u64)
        });
    }
    for mut rx in dst.bulk {
        tasks.spawn(async move {
            let mut got = 0u64;
            while let Some(c) = rx.read_chunk(usize::MAX, true).await? {
                got += c.bytes.len() as u64;
            }
            anyhow::Ok(got)
        });
    }
    let mut received = 0;
    while let Some(r) = tasks.join_next().await {
        received += r??;
    }
    let wall = start.elapsed();
    if received != per_stream * u64::from(streams) {
        bail!("raw: received {received} bytes");
    }
    Ok(Row {
        name: if from_memory {
            "raw quinn, memory views"
        } else {
            "raw quinn"
        }
        .into(),
        streams,
        bytes: received,
        wall,
        cpu: since(cpu0),
        note: if from_memory {
            "sender's data comes from memory, no copy"
        } else {
            "one hot 1 MiB buffer"
        }
        .into(),
    })
}

/// Spare 1 MiB send buffers for [`raw_copies`]: a buffer comes back when
/// quinn drops the last view of it (as the driver's frame pool does).
#[derive(Clone, Default)]
struct SparePool(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

struct Spare(Vec<u8>, SparePool);

impl AsRef<[u8]> for Spare {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        let mut spare = self.1 .0.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < 64 {
            spare.push(buf);
        }
    }
}

/// Plain quinn streams that move guest memory the way any migration must:
/// the sender copies pages out of guest memory into its send buffers, the
/// receiver copies what arrives into guest memory. No framing, no CRC, no
/// sessions: the ceiling for a page protocol over the same streams.
/// `sender_copies` false: the sender hands quinn views of guest memory
/// instead (possible only for memory that cannot change under the send,
/// a paused guest), so only the receiver's copy is left: the floor of any
/// transfer that lands in guest memory.
async fn raw_copies(
    pair: &mut Pair,
    streams: u16,
    size: u64,
    sender_copies: bool,
) -> anyhow::Result<Row> {
    const CHUNK: usize = 1 << 20;
    let (src, dst) = pair.streams(streams).await?;
    let mem = Bytes::from(memory(Content::Random).0);
    let per_stream = size / u64::from(streams);
    let pool = SparePool::default();
    let mut sinks = Vec::new();
    for _ in 0..streams {
        // Touched before the clock starts, like a mapped memfd; together
        // as large as the page rows' sink.
        sinks.push(guest_memory(vec![
            1u8;
            BUFFER_PAGES / usize::from(streams)
                * PAGE_SIZE
        ]));
    }
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut tx) in src.bulk.into_iter().enumerate() {
        let (mem, pool) = (mem.clone(), pool.clone());
        tasks.spawn(async move {
            let first = i as u64 * per_stream;
            let mut sent = 0u64;
            while sent < per_stream {
                let n = (per_stream - sent).min(CHUNK as u64) as usize;
                let page = PageIndex((first + sent) / PAGE_SIZE as u64);
                if !sender_copies {
                    let at = offset(page);
                    let n = n.min(mem.len() - at);
                    tx.write_chunk(mem.slice(at..at + n)).await?;
                    sent += n as u64;
                    continue;
                }
                let mut buf = pool
                    .0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop()
                    .unwrap_or_else(|| Vec::with_capacity(CHUNK));
                buf.clear();
                let mut page = page;
                while buf.len() < n {
                    let at = offset(page);
                    buf.extend_from_slice(&mem[at..at + PAGE_SIZE]);
                    page.0 += 1;
                }
                tx.write_chunk(Bytes::from_owner(Spare(buf, pool.clone())))
                    .await?;
                sent += n as u64;
            }
            tx.finish()?;
            let _ = tx.stopped().await;
            anyhow::Ok(None)
        });
    }
    for (i, (mut rx, mut sink)) in dst.bulk.into_iter().zip(sinks).enumerate() {
        tasks.spawn(async move {
            let first = i as u64 * per_stream;
            let mut got = 0u64;
            while let Some(c) = rx.read_chunk(usize::MAX, true).await? {
                // Ordered reads: the chunk starts at guest byte
                // `first + got` (stream offsets also count the stream
                // header).
                sink.write_bytes(first + got, &c.bytes)?;
                got += c.bytes.len() as u64;
            }
            anyhow::Ok(Some((got, sink)))
        });
    }
    let mut received = 0;
    let mut sinks = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Some((got, sink)) = r?? {
            received += got;
            sinks.push(sink);
        }
    }
    let wall = start.elapsed();
    let cpu = since(cpu0);
    if received != size {
        bail!("raw + copies: received {received} bytes");
    }
    let covered = (per_stream as usize).min(mem.len());
    if streams == 1 && sinks[0].0[..covered] != mem[..covered] {
        bail!("raw + copies: destination memory differs");
    }
    Ok(Row {
        name: if sender_copies {
            "raw quinn + memory copies"
        } else {
            "raw quinn + receiver copy"
        }
        .into(),
        streams,
        bytes: received,
        wall,
        cpu,
        note: if sender_copies {
            "sender reads, receiver writes guest memory"
        } else {
            "memory views sent, receiver writes guest memory"
        }
        .into(),
    })
}

/// One pre-copy pass of `size` bytes through the sessions and drivers.
async fn pages(
    pair: &mut Pair,
    streams: u16,
    size: u64,
    content: Content,
    zstd: bool,
    batch_pages: usize,
) -> anyhow::Result<Row> {
    let (src_streams, dst_streams) = pair.streams(streams).await?;
    let mem = memory(content);
    let total_pages = size / PAGE_SIZE as u64;
    let layout = MemoryLayout::x86(size).context("layout")?;
    let destination = tokio::spawn(async move {
        // Touched before the clock starts, like a destination's memfd that
        // is already mapped: page faults of the sink are not the protocol's.
        let mut sink = guest_memory(vec![1u8; BUFFER_PAGES * PAGE_SIZE]);
        let mut session = DestinationSession::new(DestOptions {
            auto_accept: true,
            max_streams: 64,
            ..DestOptions::default()
        });
        let mut driver = DestinationDriver::new(dst_streams);
        loop {
            match driver.next_event(&mut session, &mut sink).await? {
                DestEvent::PassComplete(_) => return anyhow::Ok(sink),
                DestEvent::State(_) => {}
                other => bail!("unexpected {other:?}"),
            }
        }
    });
    let mut session = SourceSession::new(
        layout,
        SourceOptions {
            compress: zstd,
            batch_pages,
            max_streams: streams,
            ..SourceOptions::default()
        },
    )?;
    let mut driver = SourceDriver::new(src_streams, RateLimiter::unlimited());
    driver.handshake(&mut session, &mem).await?;
    // As the daemon does: zstd and XOR deltas together (a link-bound
    // migration), or neither (a CPU-bound one).
    session.set_compression(Compression { zstd, delta: zstd })?;
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let stats = driver
        .send_pass(&mut session, &mem, &[PageRange::new(0, total_pages)], &[])
        .await?;
    let wall = start.elapsed();
    let cpu = since(cpu0);
    let sink = destination.await??;
    // Only the part of the buffer the layout covers was sent.
    let covered = (size as usize).min(mem.0.len());
    if sink.0[..covered] != mem.0[..covered] {
        bail!("destination memory differs");
    }
    let wire = stats.wire_bytes as f64 / size as f64;
    Ok(Row {
        name: format!(
            "pages {:?} zstd {}",
            content,
            if zstd { "on" } else { "off" }
        ),
        streams,
        bytes: size,
        wall,
        cpu,
        note: format!("wire {:.0}% of memory", wire * 100.0),
    })
}

/// Post-copy round trips of single-page requests.
async fn rtt(pair: &mut Pair, requests: u32) -> anyhow::Result<(Duration, Duration, Duration)> {
    let (src_streams, dst_streams) = pair.streams(1).await?;
    let size = (BUFFER_PAGES * PAGE_SIZE) as u64;
    let mem = memory(Content::Random);
    let layout = MemoryLayout::x86(size)?;
    let source = tokio::spawn(async move {
        let mut session = SourceSession::new(
            layout,
            SourceOptions {
                postcopy: true,
                ..SourceOptions::default()
            },
        )?;
        let mut driver = SourceDriver::new(src_streams, RateLimiter::unlimited());
        driver.handshake(&mut session, &mem).await?;
        driver
            .switchover(&mut session, &mem, b"state", true)
            .await?;
        driver.serve_until_done(&mut session, &mem).await?;
        anyhow::Ok(())
    });
    let mut sink = guest_memory(vec![0u8; BUFFER_PAGES * PAGE_SIZE]);
    let mut session = DestinationSession::new(DestOptions {
        auto_accept: true,
        ..DestOptions::default()
    });
    let mut driver = DestinationDriver::new(dst_streams);
    loop {
        match driver.next_event(&mut session, &mut sink).await? {
            DestEvent::SwitchedOver { postcopy: true } => break,
            DestEvent::State(_) => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    let mut times = Vec::with_capacity(requests as usize);
    let mut x: u64 = 12345;
    for _ in 0..requests {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let index = PageIndex((x >> 33) % BUFFER_PAGES as u64);
        let t = Instant::now();
        driver
            .request_pages(&mut session, &mut sink, index, 1)
            .await?;
        times.push(t.elapsed());
    }
    let done = session.resumed()?;
    driver.send_control(&done).await?;
    source.await??;
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    Ok((pct(0.50), pct(0.99), pct(1.0)))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building runtime")?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut pair = Pair::new(&args, false).await?;
    // Raw quinn is the best of both windows: a hot buffer does not gain
    // from the small window that keeps page frames in cache.
    let mut fixed = Pair::new(&args, true).await?;
    let size = args.size;
    let mut rows = Vec::new();
    let counts = match args.streams {
        Some(n) => vec![n],
        None => vec![1, 4],
    };
    for streams in counts {
        if !args.pages_only {
            rows.push(raw(&mut pair, streams, size, false).await?);
            let mut row = raw(&mut fixed, streams, size, false).await?;
            row.name = "raw quinn, fixed window".into();
            row.note = format!(
                "one hot 1 MiB buffer, send window always {} MiB",
                EndpointConfig::default().send_window >> 20
            );
            rows.push(row);
            rows.push(raw(&mut pair, streams, size, true).await?);
            rows.push(raw_copies(&mut pair, streams, size, false).await?);
            rows.push(raw_copies(&mut pair, streams, size, true).await?);
        }
        rows.push(
            pages(
                &mut pair,
                streams,
                size,
                Content::Random,
                false,
                args.batch_pages,
            )
            .await?,
        );
    }
    let others: &[(Content, bool)] = if args.compare_only {
        &[]
    } else {
        &[
            (Content::Random, true),
            (Content::Compressible, false),
            (Content::Compressible, true),
            (Content::Zero, false),
        ]
    };
    for &(content, zstd) in others {
        rows.push(pages(&mut pair, 4, size, content, zstd, args.batch_pages).await?);
    }
    let stats = pair.src.stats();
    println!(
        "loopback, {} per row, batch {} pages, mtu {} (path mtu now {}), 2 tokio workers",
        human(size),
        args.batch_pages,
        args.mtu,
        stats.path.current_mtu
    );
    println!(
        "page connection at the end: rtt {:?}, lost packets {}, congestion events {}",
        stats.path.rtt, stats.path.lost_packets, stats.path.congestion_events
    );
    println!(
        "{:<28} {:>7} {:>9} {:>8} {:>10} {:>12}  note",
        "row", "streams", "GiB/s", "wall s", "cpu s/GiB", "faults/GiB"
    );
    for r in &rows {
        println!(
            "{:<28} {:>7} {:>9.3} {:>8.2} {:>10.2} {:>12.0}  {}",
            r.name,
            r.streams,
            r.gib_s(),
            r.wall.as_secs_f64(),
            r.cpu_per_gib(),
            r.faults_per_gib(),
            r.note
        );
    }
    for streams in [1u16, 4] {
        let row = |name: &str| rows.iter().find(|r| r.name == name && r.streams == streams);
        let raw = rows
            .iter()
            .filter(|r| r.name.starts_with("raw quinn") && r.note.starts_with("one hot"))
            .filter(|r| r.streams == streams)
            .max_by(|a, b| a.gib_s().total_cmp(&b.gib_s()));
        let page = row("pages Random zstd off");
        let floor = row("raw quinn + receiver copy");
        let ratios = [
            ("page protocol / raw quinn (the faster window)", page, raw),
            (
                "raw quinn + receiver copy / raw quinn (the faster window)",
                floor,
                raw,
            ),
            (
                "page protocol / raw quinn from memory views",
                page,
                row("raw quinn, memory views"),
            ),
            (
                "page protocol / raw quinn + memory copies",
                page,
                row("raw quinn + memory copies"),
            ),
        ];
        for (label, over, under) in ratios {
            if let (Some(over), Some(under)) = (over, under) {
                println!(
                    "{label}, {streams} stream(s): {:.0}%",
                    100.0 * over.gib_s() / under.gib_s()
                );
            }
        }
    }
    if args.compare_only {
        return Ok(());
    }
    let (p50, p99, max) = rtt(&mut pair, args.requests).await?;
    println!(
        "post-copy 4 KiB request round trip over {} requests: p50 {} us, p99 {} us, max {} us",
        args.requests,
        p50.as_micros(),
        p99.as_micros(),
        max.as_micros()
    );
    Ok(())
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / GIB)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}
