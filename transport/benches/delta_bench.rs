//! Wire bytes and CPU throughput of a dirty pass with and without XOR
//! deltas, sans-IO (sessions only, no QUIC), printed as a table.
//!
//! Pass 0 sends `--size` of memory; then each row runs dirty passes over
//! `--dirty` pages, each changed in `--bytes` bytes ("sparse", as a guest
//! updating counters and list pointers leaves pages) or rewritten
//! entirely ("rewrite", the worst case for deltas). Source and destination
//! time are measured separately (one thread each side in a real migration).
//!
//! Run: `cargo bench -p transport --bench delta_bench -- --size 256M`

use std::time::{Duration, Instant};

use clap::Parser;
use transport::codec::FrameBuffer;
use transport::layout::{MemoryLayout, PageRange, PAGE_SIZE};
use transport::session::{
    Compression, DestAction, DestOptions, DestinationSession, PassStats, SourceOptions,
    SourceSession,
};
use transport::testing::{MemPages, Rng};

#[derive(Parser, Debug)]
#[command(about = "XOR delta benchmark")]
struct Args {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_parser = parse_mib)]
    size: u64,
    /// Pages dirtied per pass.
    #[arg(long, default_value_t = 16384)]
    dirty: u64,
    /// Bytes changed per sparse-dirtied page.
    #[arg(long, default_value_t = 16)]
    bytes: usize,
    /// Dirty passes per row (the numbers are their totals).
    #[arg(long, default_value_t = 3)]
    passes: u32,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_mib(s: &str) -> Result<u64, String> {
    let s = s.trim().trim_end_matches(['M', 'm']);
    s.parse::<u64>().map_err(|e| e.to_string()).and_then(|m| {
        if m == 0 {
            Err("size 0".into())
        } else {
            Ok(m)
        }
    })
}

/// Heap-like pages: some random words, much repeated text (zstd shrinks
/// them about 3x, as typical guest memory).
fn guest(pages: u64, rng: &mut Rng) -> MemPages {
    const TEXT: &[u8] = b"struct page { flags, mapping, index, private }; ";
    let mut m = MemPages::new(vec![0; pages as usize * PAGE_SIZE]);
    for (p, page) in m.0.chunks_exact_mut(PAGE_SIZE).enumerate() {
        for (i, b) in page.iter_mut().enumerate() {
            *b = TEXT[(i + p) % TEXT.len()];
        }
        for w in page[..1024].chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next().to_le_bytes());
        }
    }
    m
}

#[derive(Default)]
struct Totals {
    stats: Vec<PassStats>,
    src: Duration,
    dst: Duration,
}

fn pass(
    src: &mut SourceSession,
    dst: &mut DestinationSession,
    ranges: &[PageRange],
    smem: &MemPages,
    dmem: &mut MemPages,
    t: &mut Totals,
) {
    let mut fb = FrameBuffer::new();
    let mut out = Vec::new();
    src.begin_pass(ranges, &[], &mut out).unwrap();
    let mut acks = dst.feed(&out, dmem).unwrap();
    let mut frames = Vec::new();
    let started = Instant::now();
    loop {
        let mut f = Vec::new();
        if src.next_frame(smem, &mut f).unwrap().is_none() {
            break;
        }
        frames.push(f);
    }
    t.src += started.elapsed();
    let started = Instant::now();
    for f in &frames {
        fb.push(f);
        while let Some(frame) = fb.next_frame().unwrap() {
            acks.extend(dst.handle(frame, dmem).unwrap());
        }
    }
    t.dst += started.elapsed();
    out.clear();
    t.stats.push(src.end_pass(&mut out).unwrap());
    acks.extend(dst.feed(&out, dmem).unwrap());
    for a in acks {
        if let DestAction::Send(f) = a {
            src.handle(f, smem, &mut Vec::new()).unwrap();
        }
    }
}

fn row(args: &Args, name: &str, compression: Compression, rewrite: bool) {
    let pages = args.size * 256;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut smem = guest(pages, &mut rng);
    let mut dmem = MemPages::new(vec![0; smem.0.len()]);
    let layout = MemoryLayout::x86(pages * PAGE_SIZE as u64).unwrap();
    let mut src = SourceSession::new(layout, SourceOptions::default()).unwrap();
    let mut dst = DestinationSession::new(DestOptions {
        auto_accept: true,
        ..DestOptions::default()
    });
    let mut out = Vec::new();
    src.hello(&mut out).unwrap();
    for a in dst.feed(&out, &mut dmem).unwrap() {
        if let DestAction::Send(f) = a {
            src.handle(f, &smem, &mut Vec::new()).unwrap();
        }
    }
    let mut warm = Totals::default();
    pass(
        &mut src,
        &mut dst,
        &[PageRange::new(0, pages)],
        &smem,
        &mut dmem,
        &mut warm,
    );
    src.set_compression(compression).unwrap();
    let mut t = Totals::default();
    let dirty = args.dirty.min(pages);
    for _ in 0..args.passes {
        // A hot working set at the start of memory, as dirty logs show.
        for p in 0..dirty as usize {
            let page = &mut smem.0[p * PAGE_SIZE..][..PAGE_SIZE];
            if rewrite {
                for w in page.chunks_exact_mut(8) {
                    w.copy_from_slice(&rng.next().to_le_bytes());
                }
            } else {
                let at = (rng.next() as usize) % (PAGE_SIZE - args.bytes);
                for b in &mut page[at..at + args.bytes] {
                    *b = rng.next() as u8;
                }
            }
        }
        pass(
            &mut src,
            &mut dst,
            &[PageRange::new(0, dirty)],
            &smem,
            &mut dmem,
            &mut t,
        );
    }
    assert!(smem.0 == dmem.0, "memory differs");
    let raw = dirty * u64::from(args.passes) * PAGE_SIZE as u64;
    let wire: u64 = t.stats.iter().map(|s| s.wire_bytes).sum();
    // The first dirty pass finds the cache holding pass 0's last pages
    // (direct-mapped) when the guest is larger than the cache; the later
    // passes show the steady state.
    let later: u64 = t.stats.iter().skip(1).map(|s| s.wire_bytes).sum();
    let later_raw = dirty * u64::from(args.passes.saturating_sub(1)) * PAGE_SIZE as u64;
    let deltas: u64 = t.stats.iter().map(|s| s.delta_pages).sum();
    let enc: u64 = t.stats.iter().map(|s| s.encode_nanos).sum();
    let gib = raw as f64 / (1u64 << 30) as f64;
    println!(
        "{name:<24} {:>8} {:>12} {:>9.1}x {:>9.1}x {:>9} {:>10.2} {:>10.2} {:>10.1}",
        if rewrite { "rewrite" } else { "sparse" },
        wire,
        raw as f64 / wire as f64,
        later_raw as f64 / later.max(1) as f64,
        deltas,
        gib / t.src.as_secs_f64(),
        gib / t.dst.as_secs_f64(),
        enc as f64 / 1e6,
    );
}

fn main() {
    let args = Args::parse();
    println!(
        "{} MiB guest, {} dirty pages x {} passes, {} bytes changed per sparse page",
        args.size, args.dirty, args.passes, args.bytes
    );
    println!(
        "{:<24} {:>8} {:>12} {:>10} {:>10} {:>9} {:>10} {:>10} {:>10}",
        "encoding",
        "dirtying",
        "wire bytes",
        "raw/wire",
        "2nd+ pass",
        "deltas",
        "src GiB/s",
        "dst GiB/s",
        "encode ms"
    );
    for rewrite in [false, true] {
        for (name, zstd, delta) in [
            ("raw", false, false),
            ("zstd", true, false),
            ("xor delta", false, true),
            ("xor delta + zstd", true, true),
        ] {
            row(&args, name, Compression { zstd, delta }, rewrite);
        }
    }
}
