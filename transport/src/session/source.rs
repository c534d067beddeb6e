//! The sending side of a migration: hello, passes of dirty pages (zero
//! detection, batching, optional zstd), state and switchover, and post-copy
//! page requests.

mod postcopy;

use std::collections::VecDeque;

pub use postcopy::PostcopyStats;

use super::delta::{Compression, DeltaCache, DeltaEncoder};
use super::PageSource;
use crate::codec::encode::{begin, finish_hashed, put_batch_fixed, put_offsets};
use crate::codec::{
    is_zero_page, AckWhat, Capabilities, EncodeError, Encoder, Frame, FrameType, Hello, HelloAck,
    PageSet, PassEnd, ReasonCode, BATCH_FIXED_LEN, MAX_BATCH_PAGES, PROTOCOL_VERSION,
};
use crate::layout::{MemoryLayout, OutOfRange, PageIndex, PageRange, PAGE_SIZE};

/// Zero runs found while filling a batch wait here; past this many the
/// batch is sent early so the queue stays small.
const MAX_PENDING_ZERO_RUNS: usize = 64;

/// How a source session behaves; fixed for the migration.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    pub host: String,
    pub migration_id: String,
    pub vm_name: String,
    /// Offer zstd; batches are compressed only if the peer agrees.
    pub compress: bool,
    pub zstd_level: i32,
    /// Pages per batch, 1..=[`MAX_BATCH_PAGES`].
    pub batch_pages: usize,
    pub max_streams: u16,
    /// Offer post-copy.
    pub postcopy: bool,
    /// Bytes of last-sent page versions kept for XOR deltas (at most one
    /// slot per guest page); below one page, `XOR_DELTA` is not offered.
    pub delta_cache_bytes: u64,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            host: String::new(),
            migration_id: String::new(),
            vm_name: String::new(),
            compress: true,
            zstd_level: 1,
            batch_pages: 64,
            max_streams: 4,
            postcopy: false,
            delta_cache_bytes: 64 << 20,
        }
    }
}

/// Where the source is in the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// `hello` not called yet.
    New,
    /// Hello sent, waiting for `HelloAck` or `Refuse`.
    HelloSent,
    /// Accepted and no pass open: `begin_pass` or `send_state` may follow.
    Idle,
    /// Producing page frames of this pass.
    InPass(u32),
    /// `PassEnd` sent, waiting for the destination's `Ack`.
    AwaitingAck(u32),
    /// State and switchover sent; waiting for `Done` (post-copy: serving
    /// page requests meanwhile).
    SwitchedOver {
        postcopy: bool,
    },
    /// Post-copy resume hello sent on a new connection; `acked` once the
    /// `HelloAck` arrived (the missing set follows).
    Resuming {
        acked: bool,
    },
    Done,
    Failed,
}

/// Counters of one pass, logged once when it ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassStats {
    pub pass: u32,
    /// Pages sent with data.
    pub pages: u64,
    /// Pages sent as zero runs (read and found zero, or known zero).
    pub zero_pages: u64,
    /// Bytes of page frames on the wire, headers included.
    pub wire_bytes: u64,
    pub batches: u64,
    pub compressed_batches: u64,
    /// Page bytes that went into compressed batches, and what they became.
    pub compressed_in: u64,
    pub compressed_out: u64,
    /// Pages sent as XOR deltas, the raw bytes they stood for and the wire
    /// bytes of their frames (headers included).
    pub delta_pages: u64,
    pub delta_in: u64,
    pub delta_wire_bytes: u64,
    /// Pages that could not be deltas because the cache lacked them (too
    /// many means the cache is too small for the dirty set).
    pub delta_cache_misses: u64,
    /// Cached pages sent normally because the delta was not smaller.
    pub delta_rejected: u64,
    /// Time spent in zstd and XOR encoding (batches with compression or a
    /// delta cache only): the CPU price of the two, for deciding whether
    /// the link or the CPU is the bottleneck.
    pub encode_nanos: u64,
}

impl PassStats {
    /// Raw size / compressed size of the batches zstd shrank (1.0 if none).
    pub fn compression_ratio(&self) -> f64 {
        if self.compressed_out == 0 {
            1.0
        } else {
            self.compressed_in as f64 / self.compressed_out as f64
        }
    }
}

/// What a frame from the destination meant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    Accepted(HelloAck),
    PassAcked(u32),
    StateAcked,
    /// A post-copy request was answered; the reply is in `out`.
    PageServed {
        id: u64,
        index: PageIndex,
        count: u32,
    },
    /// Post-copy: the destination resumed the guest (end of the downtime).
    Resumed,
    /// A post-copy resume was accepted; `missing` pages are left to push.
    ResumeAccepted {
        missing: u64,
    },
    /// The destination runs the guest (post-copy: and holds every page).
    Done,
    /// Post-copy, after `Done`: the destination's numbers.
    Report(crate::codec::PostcopyReport),
}

/// Why the source cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("encoding a frame failed")]
    Encode(#[from] EncodeError),
    #[error("reading page {index} failed")]
    ReadPage {
        index: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid source options")]
    Options,
    #[error("{op} not allowed in state {state:?}")]
    WrongState {
        op: &'static str,
        state: SourceState,
    },
    #[error("unexpected {frame:?} in state {state:?}")]
    Unexpected {
        frame: FrameType,
        state: SourceState,
    },
    #[error("pass ranges must be sorted and not overlap")]
    UnsortedRanges,
    #[error("page range outside the layout")]
    OutOfRange(#[from] OutOfRange),
    #[error("destination speaks version {theirs}, we speak {ours}")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("destination refused: {code}")]
    Refused { code: ReasonCode, message: String },
    #[error("destination aborted: {code}")]
    PeerAborted { code: ReasonCode, message: String },
}

impl SourceError {
    pub fn reason(&self) -> ReasonCode {
        match self {
            SourceError::Unexpected { .. } => ReasonCode::Protocol,
            SourceError::OutOfRange(_) => ReasonCode::OutOfRange,
            SourceError::VersionMismatch { .. } => ReasonCode::VersionMismatch,
            SourceError::Refused { code, .. } | SourceError::PeerAborted { code, .. } => *code,
            _ => ReasonCode::Internal,
        }
    }

    /// The abort to send to the destination, or `None` when the peer ended
    /// the migration itself.
    pub fn abort_frame(&self) -> Option<Frame> {
        match self {
            SourceError::Refused { .. } | SourceError::PeerAborted { .. } => None,
            e => Some(Frame::Abort {
                code: e.reason(),
                message: e.to_string(),
            }),
        }
    }
}

/// Pages still to send in the open pass.
#[derive(Debug, Default)]
struct PassCursor {
    ranges: Vec<PageRange>,
    range: usize,
    offset: u64,
    known_zero: VecDeque<PageRange>,
    zero_runs: VecDeque<PageRange>,
}

impl PassCursor {
    fn next_index(&mut self) -> Option<u64> {
        while let Some(r) = self.ranges.get(self.range) {
            if self.offset < r.count {
                self.offset += 1;
                return Some(r.start.0 + self.offset - 1);
            }
            self.range += 1;
            self.offset = 0;
        }
        None
    }

    fn push_zero(&mut self, index: u64) {
        match self.zero_runs.back_mut() {
            Some(r) if r.start.0 + r.count == index => r.count += 1,
            _ => self.zero_runs.push_back(PageRange::new(index, 1)),
        }
    }

    fn exhausted(&self) -> bool {
        self.range >= self.ranges.len() && self.known_zero.is_empty() && self.zero_runs.is_empty()
    }
}

/// The source side of one migration. See the module docs for the flow.
#[derive(Debug)]
pub struct SourceSession {
    layout: MemoryLayout,
    opts: SourceOptions,
    state: SourceState,
    agreed: Capabilities,
    encoder: Encoder,
    next_pass: u32,
    cursor: PassCursor,
    current: PassStats,
    history: Vec<PassStats>,
    /// Page bytes of the batch being built when compressing.
    scratch: Vec<u8>,
    offsets: Vec<u32>,
    /// Switched over in post-copy mode: page requests are served from now on.
    postcopy_active: bool,
    /// Wanted encodings; `encoder` and `delta` follow them where agreed.
    compression: Compression,
    /// The XOR delta cache, while deltas are on and `XOR_DELTA` agreed.
    delta: Option<DeltaEncoder>,
    /// Post-copy push set, when the switchover named the missing pages.
    push: Option<postcopy::Push>,
    postcopy_stats: PostcopyStats,
}

impl SourceSession {
    pub fn new(layout: MemoryLayout, opts: SourceOptions) -> Result<Self, SourceError> {
        let compression = Compression {
            zstd: opts.compress,
            delta: opts.delta_cache_bytes > 0,
        };
        if opts.batch_pages == 0 || opts.batch_pages > MAX_BATCH_PAGES {
            return Err(SourceError::Options);
        }
        Ok(Self {
            layout,
            encoder: Encoder::new(None)?,
            opts,
            state: SourceState::New,
            agreed: Capabilities::default(),
            next_pass: 0,
            cursor: PassCursor::default(),
            current: PassStats::default(),
            history: Vec::new(),
            scratch: Vec::new(),
            offsets: Vec::new(),
            postcopy_active: false,
            compression,
            delta: None,
            push: None,
            postcopy_stats: PostcopyStats::default(),
        })
    }

    pub fn state(&self) -> SourceState {
        self.state
    }

    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Capabilities both sides agreed on (empty before `HelloAck`).
    pub fn capabilities(&self) -> Capabilities {
        self.agreed
    }

    /// Stats of every finished pass, in order.
    pub fn pass_stats(&self) -> &[PassStats] {
        &self.history
    }

    fn expect(&self, op: &'static str, ok: bool) -> Result<(), SourceError> {
        if ok {
            Ok(())
        } else {
            Err(SourceError::WrongState {
                op,
                state: self.state,
            })
        }
    }

    fn offered(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        if self.opts.compress {
            caps = caps | Capabilities::ZSTD;
        }
        if self.opts.postcopy {
            caps = caps | Capabilities::POSTCOPY;
        }
        if self.opts.delta_cache_bytes >= PAGE_SIZE as u64 {
            caps = caps | Capabilities::XOR_DELTA;
        }
        caps
    }

    /// Switches zstd and XOR deltas on or off for the page frames that
    /// follow (e.g. deltas only while the link, not the CPU, limits the
    /// migration; see `PassStats::encode_nanos`). Each takes effect only if
    /// the peer agreed on it. The delta cache exists only while deltas are
    /// on: keeping it costs a copy of every page sent, which on a fast link
    /// is a tenth of the throughput. Switching deltas off drops it;
    /// switching them on starts it empty, so pages sent from then on are
    /// the ones later passes can send as deltas.
    pub fn set_compression(&mut self, compression: Compression) -> Result<(), SourceError> {
        self.compression = compression;
        self.apply_compression()
    }

    /// The encodings asked for (see [`set_compression`](Self::set_compression)).
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Makes the encoder match the wanted and agreed compression, and keeps
    /// a delta cache exactly while deltas are wanted and `XOR_DELTA` is
    /// agreed.
    fn apply_compression(&mut self) -> Result<(), SourceError> {
        let zstd = self.compression.zstd && self.agreed.contains(Capabilities::ZSTD);
        if zstd != self.encoder.compresses() {
            self.encoder = Encoder::new(zstd.then_some(self.opts.zstd_level))?;
        }
        let delta = self.compression.delta && self.agreed.contains(Capabilities::XOR_DELTA);
        if !delta {
            self.delta = None;
        } else if self.delta.is_none() {
            let cache = DeltaCache::new(self.opts.delta_cache_bytes, self.layout.total_pages());
            self.delta = cache
                .map(|c| DeltaEncoder::new(c, self.opts.zstd_level))
                .transpose()?;
        }
        Ok(())
    }

    /// Appends the `Hello` (control stream).
    pub fn hello(&mut self, out: &mut Vec<u8>) -> Result<(), SourceError> {
        self.expect("hello", self.state == SourceState::New)?;
        self.hello_frame(self.offered()).encode(out)?;
        self.state = SourceState::HelloSent;
        Ok(())
    }

    /// The `Hello` of this migration, offering `capabilities` (a fresh one
    /// or, with `RESUME`, a resume).
    fn hello_frame(&self, capabilities: Capabilities) -> Frame {
        Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            capabilities,
            max_streams: self.opts.max_streams,
            host: self.opts.host.clone(),
            migration_id: self.opts.migration_id.clone(),
            vm_name: self.opts.vm_name.clone(),
            layout: self.layout.clone(),
        })
    }

    /// Opens the next pass (numbered from 0) and appends `PassBegin`
    /// (control stream). `pages` are the pages to read and send; `known_zero`
    /// are pages the caller knows are zero (memfd holes), sent as zero runs
    /// without reading them. Both must be sorted, non-overlapping ranges
    /// inside the layout. Returns the pass number.
    pub fn begin_pass(
        &mut self,
        pages: &[PageRange],
        known_zero: &[PageRange],
        out: &mut Vec<u8>,
    ) -> Result<u32, SourceError> {
        // After a post-copy switchover the remaining pages are pushed in
        // background passes while faults are served.
        let postcopy = self.state == SourceState::SwitchedOver { postcopy: true };
        self.expect("begin_pass", self.state == SourceState::Idle || postcopy)?;
        for list in [pages, known_zero] {
            let mut prev_end = 0;
            for r in list {
                self.layout.check_range(r.start, r.count)?;
                if r.start.0 < prev_end {
                    return Err(SourceError::UnsortedRanges);
                }
                prev_end = r.start.0 + r.count;
            }
        }
        let pass = self.next_pass;
        Frame::PassBegin { pass }.encode(out)?;
        self.cursor = PassCursor {
            ranges: pages.iter().filter(|r| r.count > 0).copied().collect(),
            known_zero: known_zero.iter().filter(|r| r.count > 0).copied().collect(),
            ..PassCursor::default()
        };
        self.current = PassStats {
            pass,
            ..PassStats::default()
        };
        self.next_pass += 1;
        self.state = SourceState::InPass(pass);
        Ok(pass)
    }

    /// Appends the next page frame of the open pass (a bulk stream of the
    /// caller's choice); returns its type, or `None` once the pass has
    /// nothing more to send (then call [`end_pass`](Self::end_pass)). A
    /// batch split into an `XorPageBatch` and a normal batch appends both
    /// (the type returned is the first's); send them on one stream.
    pub fn next_frame(
        &mut self,
        src: &(impl PageSource + ?Sized),
        out: &mut Vec<u8>,
    ) -> Result<Option<FrameType>, SourceError> {
        let SourceState::InPass(pass) = self.state else {
            return Err(SourceError::WrongState {
                op: "next_frame",
                state: self.state,
            });
        };
        let before = out.len();
        let ty = if let Some(r) = self.cursor.known_zero.pop_front() {
            self.zero_run(pass, r, out)?
        } else if let Some(r) = self.cursor.zero_runs.pop_front() {
            self.zero_run(pass, r, out)?
        } else {
            match self.fill_batch(pass, src, out)? {
                Some(ty) => ty,
                None => match self.cursor.zero_runs.pop_front() {
                    Some(r) => self.zero_run(pass, r, out)?,
                    None => return Ok(None),
                },
            }
        };
        self.current.wire_bytes += (out.len() - before) as u64;
        Ok(Some(ty))
    }

    fn zero_run(
        &mut self,
        pass: u32,
        r: PageRange,
        out: &mut Vec<u8>,
    ) -> Result<FrameType, SourceError> {
        Frame::ZeroRun {
            pass,
            start: r.start,
            count: r.count,
        }
        .encode(out)?;
        self.current.zero_pages += r.count;
        if let Some(d) = &mut self.delta {
            // The destination's copy is zero now, not the cached data.
            d.cache.invalidate(r);
        }
        Ok(FrameType::ZeroRun)
    }

    /// Reads pages until a batch is full, appending a batch frame if any
    /// page held data. Zero pages found on the way are queued as runs.
    fn fill_batch(
        &mut self,
        pass: u32,
        src: &(impl PageSource + ?Sized),
        out: &mut Vec<u8>,
    ) -> Result<Option<FrameType>, SourceError> {
        // With a delta cache pages also go to `scratch`: they are cached and
        // may be split into a delta and a normal frame.
        let via_delta = self.delta.is_some();
        let compress = self.encoder.compresses() || via_delta;
        // Without compression pages are read straight into the frame; with
        // it they go to `scratch` first and only zstd output is copied.
        let start = out.len();
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let target: &mut Vec<u8> = if compress {
            &mut scratch
        } else {
            begin(out, FrameType::PageBatch);
            out.resize(out.len() + BATCH_FIXED_LEN, 0);
            &mut *out
        };
        self.offsets.clear();
        let mut first = 0;
        // CRC of the raw pages, taken while each is still in cache.
        let mut data_crc = crc32fast::Hasher::new();
        let result = loop {
            if self.offsets.len() >= self.opts.batch_pages
                || self.cursor.zero_runs.len() >= MAX_PENDING_ZERO_RUNS
            {
                break Ok(());
            }
            let Some(index) = self.cursor.next_index() else {
                break Ok(());
            };
            let pos = target.len();
            target.resize(pos + PAGE_SIZE, 0);
            let page = target[pos..]
                .first_chunk_mut::<PAGE_SIZE>()
                .ok_or(SourceError::Options)?;
            if let Err(source) = src.read_page(PageIndex(index), page) {
                break Err(SourceError::ReadPage { index, source });
            }
            if is_zero_page(&target[pos..]) {
                target.truncate(pos);
                self.cursor.push_zero(index);
                continue;
            }
            if !compress {
                data_crc.update(&target[pos..]);
            }
            if self.offsets.is_empty() {
                first = index;
            }
            // Layouts hold at most 2^28 pages, so offsets fit in u32.
            self.offsets.push((index - first) as u32);
        };
        let n = self.offsets.len();
        let set = if self.offsets.last().is_some_and(|&o| o as usize + 1 == n) {
            PageSet::Run {
                first: PageIndex(first),
                count: n as u32,
            }
        } else {
            PageSet::List {
                first: PageIndex(first),
                offsets: self.offsets.clone(),
            }
        };
        let ty = if let Err(e) = result {
            Err(e)
        } else if n == 0 {
            Ok(None)
        } else if let Some(d) = self.delta.as_mut() {
            let use_delta = self.compression.delta && !self.postcopy_active;
            let (encoder, stats) = (&mut self.encoder, &mut self.current);
            d.encode_batch(pass, &set, &scratch, use_delta, encoder, out, stats)
                .map(Some)
        } else if compress {
            let started = std::time::Instant::now();
            let ty = self.encoder.encode_batch(pass, &set, &scratch, out);
            let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.current.encode_nanos += nanos;
            ty.map(Some).map_err(SourceError::from)
        } else {
            let mut fixed = Vec::with_capacity(BATCH_FIXED_LEN);
            put_batch_fixed(&mut fixed, pass, &set);
            let data_at = start + crate::codec::HEADER_LEN + BATCH_FIXED_LEN;
            out[data_at - BATCH_FIXED_LEN..data_at].copy_from_slice(&fixed);
            put_offsets(out, &set);
            finish_hashed(out, start, data_at, &data_crc, n * PAGE_SIZE);
            Ok(Some(FrameType::PageBatch))
        };
        self.scratch = scratch;
        match ty {
            Ok(Some(ty)) if via_delta => {
                // The delta encoder counted its frames (one or two).
                self.current.pages += n as u64;
                Ok(Some(ty))
            }
            Ok(Some(ty)) => {
                self.current.pages += n as u64;
                self.current.batches += 1;
                if ty == FrameType::CompressedPageBatch {
                    self.current.compressed_batches += 1;
                    self.current.compressed_in += (n * PAGE_SIZE) as u64;
                    self.current.compressed_out += (out.len() - start) as u64;
                }
                Ok(Some(ty))
            }
            other => {
                out.truncate(start);
                other
            }
        }
    }

    /// Closes the open pass, appending `PassEnd` (control stream). Every
    /// page frame of the pass must have been taken with `next_frame`.
    pub fn end_pass(&mut self, out: &mut Vec<u8>) -> Result<PassStats, SourceError> {
        let SourceState::InPass(pass) = self.state else {
            return Err(SourceError::WrongState {
                op: "end_pass",
                state: self.state,
            });
        };
        self.expect("end_pass", self.cursor.exhausted())?;
        let s = self.current;
        Frame::PassEnd(PassEnd {
            pass,
            pages_sent: s.pages,
            zero_pages: s.zero_pages,
            bytes: s.wire_bytes,
        })
        .encode(out)?;
        tracing::debug!(
            pass,
            pages = s.pages,
            zero_pages = s.zero_pages,
            wire_bytes = s.wire_bytes,
            ratio = s.compression_ratio(),
            delta_pages = s.delta_pages,
            delta_wire_bytes = s.delta_wire_bytes,
            delta_cache_misses = s.delta_cache_misses,
            encode_ms = s.encode_nanos / 1_000_000,
            "pass sent"
        );
        self.history.push(s);
        self.state = SourceState::AwaitingAck(pass);
        Ok(s)
    }

    /// Appends `State` and `Switchover` (control stream). Allowed once every
    /// pass is acknowledged, so no page frame can arrive after switchover.
    pub fn send_state(
        &mut self,
        blob: &[u8],
        postcopy: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), SourceError> {
        self.expect("send_state", self.state == SourceState::Idle)?;
        self.expect(
            "send_state(postcopy)",
            !postcopy || self.agreed.contains(Capabilities::POSTCOPY),
        )?;
        let start = out.len();
        let r = Frame::State {
            blob: blob.to_vec(),
        }
        .encode(out)
        .and_then(|()| Frame::Switchover { postcopy }.encode(out));
        if let Err(e) = r {
            out.truncate(start);
            return Err(e.into());
        }
        self.state = SourceState::SwitchedOver { postcopy };
        self.postcopy_active = postcopy;
        Ok(())
    }

    /// Appends an `Abort` (control stream) and fails the session.
    pub fn abort(&mut self, code: ReasonCode, message: &str, out: &mut Vec<u8>) {
        self.state = SourceState::Failed;
        // An abort message is cut to fit, so this cannot fail.
        let _ = Frame::Abort {
            code,
            message: message.to_owned(),
        }
        .encode(out);
    }

    /// Handles a frame from the destination. A `PageRequest` is answered by
    /// appending a `PageReply` to `out` (the post-copy stream). On error the
    /// session is failed; send [`SourceError::abort_frame`] if there is one.
    pub fn handle(
        &mut self,
        frame: Frame,
        src: &(impl PageSource + ?Sized),
        out: &mut Vec<u8>,
    ) -> Result<Option<SourceEvent>, SourceError> {
        let r = self.handle_inner(frame, src, out);
        if r.is_err() {
            self.state = SourceState::Failed;
        }
        r
    }

    fn handle_inner(
        &mut self,
        frame: Frame,
        src: &(impl PageSource + ?Sized),
        out: &mut Vec<u8>,
    ) -> Result<Option<SourceEvent>, SourceError> {
        let unexpected = |state| SourceError::Unexpected {
            frame: frame.frame_type(),
            state,
        };
        match (&frame, self.state) {
            (Frame::Abort { code, message }, _) => Err(SourceError::PeerAborted {
                code: *code,
                message: message.clone(),
            }),
            (Frame::Refuse { code, message }, SourceState::HelloSent) => {
                Err(SourceError::Refused {
                    code: *code,
                    message: message.clone(),
                })
            }
            (Frame::HelloAck(ack), SourceState::HelloSent) => {
                if ack.version != PROTOCOL_VERSION {
                    return Err(SourceError::VersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: ack.version,
                    });
                }
                self.agreed = self.offered().intersect(ack.capabilities);
                self.apply_compression()?;
                self.state = SourceState::Idle;
                Ok(Some(SourceEvent::Accepted(*ack)))
            }
            (Frame::Ack(AckWhat::Pass(n)), SourceState::AwaitingAck(p)) if *n == p => {
                self.state = if self.postcopy_active {
                    SourceState::SwitchedOver { postcopy: true }
                } else {
                    SourceState::Idle
                };
                Ok(Some(SourceEvent::PassAcked(p)))
            }
            (Frame::Ack(AckWhat::State), SourceState::SwitchedOver { .. }) => {
                Ok(Some(SourceEvent::StateAcked))
            }
            (Frame::Resumed, SourceState::SwitchedOver { postcopy: true }) => {
                Ok(Some(SourceEvent::Resumed))
            }
            (Frame::Refuse { code, message }, SourceState::Resuming { acked: false }) => {
                Err(SourceError::Refused {
                    code: *code,
                    message: message.clone(),
                })
            }
            (Frame::HelloAck(ack), SourceState::Resuming { acked: false }) => {
                self.resume_acked(ack.capabilities)?;
                Ok(None)
            }
            (Frame::MissingPages { last, ranges }, SourceState::Resuming { acked: true }) => {
                Ok(self
                    .resume_missing(*last, ranges)?
                    .map(|missing| SourceEvent::ResumeAccepted { missing }))
            }
            (Frame::Done, _)
                if self.postcopy_active
                    || matches!(self.state, SourceState::SwitchedOver { .. }) =>
            {
                self.state = SourceState::Done;
                Ok(Some(SourceEvent::Done))
            }
            (Frame::PostcopyReport(r), SourceState::Done) if self.postcopy_active => {
                Ok(Some(SourceEvent::Report(*r)))
            }
            (Frame::PageRequest { id, index, count }, _) if self.postcopy_active => {
                self.layout.check_range(*index, u64::from(*count))?;
                self.reply(*id, *index, *count, src, out)?;
                self.note_request(*index, *count);
                Ok(Some(SourceEvent::PageServed {
                    id: *id,
                    index: *index,
                    count: *count,
                }))
            }
            (_, state) => Err(unexpected(state)),
        }
    }

    fn reply(
        &mut self,
        id: u64,
        index: PageIndex,
        count: u32,
        src: &(impl PageSource + ?Sized),
        out: &mut Vec<u8>,
    ) -> Result<(), SourceError> {
        let mut data = vec![0u8; count as usize * PAGE_SIZE];
        for (i, page) in data.chunks_exact_mut(PAGE_SIZE).enumerate() {
            let idx = index.0 + i as u64;
            let page = page.first_chunk_mut().ok_or(SourceError::Options)?;
            src.read_page(PageIndex(idx), page)
                .map_err(|source| SourceError::ReadPage { index: idx, source })?;
        }
        Frame::PageReply {
            id,
            index,
            data: data.into(),
        }
        .encode(out)?;
        Ok(())
    }
}
