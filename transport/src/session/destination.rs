//! The receiving side of a migration: checks every frame against the
//! protocol state and the negotiated layout, then writes pages to a
//! [`PageSink`] and produces replies.
//!
//! States: `AwaitHello` → (`AwaitAccept` →) `Receiving` → `StateReceived`
//! → `SwitchedOver` → `Done`, and `Refused`/`Failed` from anywhere. Page
//! frames are accepted only in `Receiving` (and in `SwitchedOver` after a
//! post-copy switchover), and only for the pass after the last completed
//! one.

mod postcopy;

use std::collections::HashMap;

pub use postcopy::DestPostcopyStats;

use super::delta::{self, ReceivedPages};
use super::missing::PageBitmap;
use super::PageSink;
use crate::codec::{
    AckWhat, Capabilities, DecodeError, Frame, FrameBuffer, FrameType, Hello, HelloAck, PageRuns,
    PageSet, PassEnd, ReasonCode, MAX_BATCH_PAGES, PROTOCOL_VERSION,
};
use crate::layout::{MemoryLayout, OutOfRange, PageIndex, PAGE_SIZE};

/// How a destination session answers a hello.
#[derive(Clone, Debug)]
pub struct DestOptions {
    /// Accept every valid hello at once (tests, fuzzing). Otherwise the
    /// caller gets [`DestAction::HelloReceived`] and calls
    /// [`DestinationSession::accept`] or [`DestinationSession::refuse`].
    pub auto_accept: bool,
    /// Features this side supports; the ack carries the intersection.
    pub capabilities: Capabilities,
    pub max_streams: u16,
}

impl Default for DestOptions {
    fn default() -> Self {
        Self {
            auto_accept: false,
            capabilities: Capabilities::SUPPORTED,
            max_streams: 4,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestState {
    AwaitHello,
    /// Hello received; the caller decides whether to accept it.
    AwaitAccept,
    Receiving,
    StateReceived,
    SwitchedOver {
        postcopy: bool,
    },
    /// Post-copy connection broke: waiting for the source's resume hello
    /// (see [`DestinationSession::prepare_resume`]).
    AwaitResume,
    Done,
    Refused,
    Failed,
}

/// What the caller must do after a frame was handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestAction {
    /// Send this frame on the control stream.
    Send(Frame),
    /// Decide with `accept` or `refuse` (only without `auto_accept`).
    HelloReceived(Box<Hello>),
    /// Every page of this pass arrived and was written.
    PassComplete(PassEnd),
    /// The device + vCPU state to restore.
    StateReceived(Vec<u8>),
    /// Restore the state, resume the guest, then call `resumed`.
    SwitchedOver { postcopy: bool },
    /// A post-copy reply was handled (only the pages still missing were
    /// written).
    PageReplyReceived {
        id: u64,
        index: PageIndex,
        count: u32,
    },
    /// A post-copy resume was accepted (the `HelloAck` and the missing set
    /// are in the `Send` actions before this); send
    /// [`DestinationSession::outstanding_requests`] again on the new
    /// connection's priority stream.
    ResumeAccepted { missing: u64 },
    /// Post-copy: every page is here and `Done` was queued to send.
    PostcopyComplete,
}

/// Why the destination rejected a frame. Except for `PeerAborted` and
/// `Failed`, send [`DestError::abort_frame`] to the source.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
    #[error("malformed frame")]
    Decode(#[from] DecodeError),
    #[error("page range outside the layout")]
    OutOfRange(#[from] OutOfRange),
    #[error("unexpected {frame:?} in state {state:?}")]
    Unexpected { frame: FrameType, state: DestState },
    #[error("frame for pass {got}, expected pass {expected}")]
    WrongPass { got: u32, expected: u32 },
    #[error(
        "pass {pass} got {pages} data and {zero_pages} zero pages, more than its end announced"
    )]
    PassOverflow {
        pass: u32,
        pages: u64,
        zero_pages: u64,
    },
    #[error("page data of {len} bytes does not match {pages} pages")]
    DataLength { len: usize, pages: usize },
    #[error("reply to unknown page request {id}")]
    UnknownRequest { id: u64 },
    #[error("page request of {count} pages, must be 1..={max}")]
    RequestSize { count: u32, max: usize },
    #[error("writing received pages failed")]
    Sink(#[source] std::io::Error),
    #[error("reading back page for a delta failed")]
    ReadBack(#[source] std::io::Error),
    #[error("delta for page {index}, which no earlier pass sent")]
    DeltaWithoutBase { index: u64 },
    #[error("page {index} rebuilt from a delta has crc {actual:#010x}, expected {expected:#010x}")]
    DeltaCrc {
        index: u64,
        expected: u32,
        actual: u32,
    },
    #[error("source aborted: {code}")]
    PeerAborted { code: ReasonCode, message: String },
    #[error("{op} not allowed in state {state:?}")]
    WrongState { op: &'static str, state: DestState },
    #[error("session already failed")]
    Failed,
}

impl DestError {
    pub fn reason(&self) -> ReasonCode {
        match self {
            DestError::Decode(e) => e.reason(),
            DestError::OutOfRange(_) => ReasonCode::OutOfRange,
            DestError::DataLength { .. } => ReasonCode::BadFrame,
            DestError::Unexpected { .. }
            | DestError::WrongPass { .. }
            | DestError::PassOverflow { .. }
            | DestError::UnknownRequest { .. }
            | DestError::DeltaWithoutBase { .. } => ReasonCode::Protocol,
            DestError::DeltaCrc { .. } => ReasonCode::BadCrc,
            DestError::PeerAborted { code, .. } => *code,
            DestError::Sink(_)
            | DestError::ReadBack(_)
            | DestError::RequestSize { .. }
            | DestError::WrongState { .. }
            | DestError::Failed => ReasonCode::Internal,
        }
    }

    /// The abort to send to the source, if this side should send one.
    pub fn abort_frame(&self) -> Option<Frame> {
        match self {
            DestError::PeerAborted { .. } | DestError::Failed => None,
            e => Some(Frame::Abort {
                code: e.reason(),
                message: e.to_string(),
            }),
        }
    }
}

/// Progress of the pass currently being received.
#[derive(Debug, Default)]
struct PassProgress {
    pass: u32,
    pages: u64,
    zero_pages: u64,
    end: Option<PassEnd>,
}

/// The destination side of one migration. See the module docs.
#[derive(Debug)]
pub struct DestinationSession {
    opts: DestOptions,
    state: DestState,
    hello: Option<Hello>,
    agreed: Capabilities,
    progress: PassProgress,
    next_request: u64,
    requests: HashMap<u64, (PageIndex, u32)>,
    input: FrameBuffer,
    /// Pages received with data, when `XOR_DELTA` was agreed.
    received: Option<ReceivedPages>,
    /// Pages rebuilt from a delta frame, before they are written.
    delta_buf: Vec<u8>,
    /// Post-copy: pages still to come (from `MissingPages` at switchover).
    missing: Option<PageBitmap>,
    /// The last `MissingPages` chunk arrived.
    missing_complete: bool,
    /// Post-copy `Resumed` was handed out.
    resumed_sent: bool,
    /// The state a resume returns to.
    resume_to: DestState,
    postcopy_stats: DestPostcopyStats,
}

impl DestinationSession {
    pub fn new(opts: DestOptions) -> Self {
        Self {
            opts,
            state: DestState::AwaitHello,
            hello: None,
            agreed: Capabilities::default(),
            progress: PassProgress::default(),
            next_request: 0,
            requests: HashMap::new(),
            input: FrameBuffer::new(),
            received: None,
            delta_buf: Vec::new(),
            missing: None,
            missing_complete: false,
            resumed_sent: false,
            resume_to: DestState::Failed,
            postcopy_stats: DestPostcopyStats::default(),
        }
    }

    pub fn state(&self) -> DestState {
        self.state
    }

    /// The source's hello, once received.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// The negotiated layout, once the hello arrived.
    pub fn layout(&self) -> Option<&MemoryLayout> {
        self.hello.as_ref().map(|h| &h.layout)
    }

    pub fn capabilities(&self) -> Capabilities {
        self.agreed
    }

    /// Decodes and handles every complete frame in `bytes` plus what earlier
    /// calls left buffered (for one stream; use one [`FrameBuffer`] per
    /// stream and [`handle`](Self::handle) when there are several).
    pub fn feed<S: PageSink + ?Sized>(
        &mut self,
        bytes: &[u8],
        sink: &mut S,
    ) -> Result<Vec<DestAction>, DestError> {
        if matches!(self.state, DestState::Failed | DestState::Refused) {
            return Err(DestError::Failed);
        }
        self.input.push(bytes);
        let mut actions = Vec::new();
        loop {
            let frame = match self.input.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(actions),
                Err(e) => return Err(self.fail(e.into())),
            };
            actions.extend(self.handle(frame, sink)?);
        }
    }

    /// Handles one decoded frame. On error nothing of the frame was written
    /// and the session is failed.
    pub fn handle<S: PageSink + ?Sized>(
        &mut self,
        frame: Frame,
        sink: &mut S,
    ) -> Result<Vec<DestAction>, DestError> {
        if matches!(self.state, DestState::Failed | DestState::Refused) {
            return Err(DestError::Failed);
        }
        let mut actions = Vec::new();
        match self.handle_inner(frame, sink, &mut actions) {
            Ok(()) => Ok(actions),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn fail(&mut self, e: DestError) -> DestError {
        self.state = DestState::Failed;
        e
    }

    /// Accepts the hello; returns the `HelloAck` to send.
    pub fn accept(&mut self) -> Result<Frame, DestError> {
        let Some(h) = self
            .hello
            .as_ref()
            .filter(|_| self.state == DestState::AwaitAccept)
        else {
            return Err(DestError::WrongState {
                op: "accept",
                state: self.state,
            });
        };
        self.agreed = h.capabilities.intersect(self.opts.capabilities);
        if self.agreed.contains(Capabilities::XOR_DELTA) {
            self.received = Some(ReceivedPages::new(h.layout.total_pages()));
        }
        self.state = DestState::Receiving;
        Ok(Frame::HelloAck(HelloAck {
            version: PROTOCOL_VERSION,
            capabilities: self.agreed,
            max_streams: h.max_streams.min(self.opts.max_streams),
        }))
    }

    /// Refuses the hello (or gives up later); returns the frame to send.
    pub fn refuse(&mut self, code: ReasonCode, message: &str) -> Frame {
        let waiting = matches!(self.state, DestState::AwaitHello | DestState::AwaitAccept);
        self.state = if waiting {
            DestState::Refused
        } else {
            DestState::Failed
        };
        let message = message.to_owned();
        if waiting {
            Frame::Refuse { code, message }
        } else {
            Frame::Abort { code, message }
        }
    }

    /// The guest runs here now; returns the frame to send on the control
    /// stream: `Done`, or after a post-copy switchover that named its
    /// missing pages `Resumed` (then `Done` follows from
    /// [`take_done`](Self::take_done) or a `DestAction::Send` once every
    /// page is installed).
    pub fn resumed(&mut self) -> Result<Frame, DestError> {
        if !matches!(self.state, DestState::SwitchedOver { .. }) || self.resumed_sent {
            return Err(DestError::WrongState {
                op: "resumed",
                state: self.state,
            });
        }
        if self.state == (DestState::SwitchedOver { postcopy: true }) && self.tracks_missing() {
            self.resumed_sent = true;
            return Ok(Frame::Resumed);
        }
        self.state = DestState::Done;
        Ok(Frame::Done)
    }

    /// Post-copy: asks for `count` pages from `index`; send the frame on the
    /// post-copy stream.
    pub fn request_pages(&mut self, index: PageIndex, count: u32) -> Result<Frame, DestError> {
        if self.state != (DestState::SwitchedOver { postcopy: true }) {
            return Err(DestError::WrongState {
                op: "request_pages",
                state: self.state,
            });
        }
        if count == 0 || count as usize > MAX_BATCH_PAGES {
            return Err(DestError::RequestSize {
                count,
                max: MAX_BATCH_PAGES,
            });
        }
        if let Some(l) = self.layout() {
            l.check_range(index, u64::from(count))?;
        }
        let id = self.next_request;
        self.next_request += 1;
        self.requests.insert(id, (index, count));
        self.postcopy_stats.requests += 1;
        Ok(Frame::PageRequest { id, index, count })
    }

    fn handle_inner<S: PageSink + ?Sized>(
        &mut self,
        frame: Frame,
        sink: &mut S,
        actions: &mut Vec<DestAction>,
    ) -> Result<(), DestError> {
        let state = self.state;
        let unexpected = DestError::Unexpected {
            frame: frame.frame_type(),
            state,
        };
        // Post-copy push frames and replies may still be on the wire when
        // the last missing page arrives: after `Done` they are dropped.
        let late_postcopy = state == DestState::Done && self.tracks_missing();
        let receiving = late_postcopy
            || matches!(
                state,
                DestState::Receiving | DestState::SwitchedOver { postcopy: true }
            );
        match frame {
            Frame::Abort { code, message } => Err(DestError::PeerAborted { code, message }),
            Frame::Hello(h) if state == DestState::AwaitResume => {
                self.resume_hello(h, actions);
                Ok(())
            }
            Frame::Hello(h) if state == DestState::AwaitHello => {
                if h.version != PROTOCOL_VERSION {
                    self.state = DestState::Refused;
                    actions.push(DestAction::Send(Frame::Refuse {
                        code: ReasonCode::VersionMismatch,
                        message: format!("version {} not supported", h.version),
                    }));
                    return Ok(());
                }
                self.hello = Some(h);
                self.state = DestState::AwaitAccept;
                if self.opts.auto_accept {
                    actions.push(DestAction::Send(self.accept()?));
                } else if let Some(h) = &self.hello {
                    actions.push(DestAction::HelloReceived(Box::new(h.clone())));
                }
                Ok(())
            }
            Frame::PassBegin { pass } if receiving => self.check_pass(pass),
            Frame::PassEnd(end) if receiving => {
                self.check_pass(end.pass)?;
                if self.progress.end.is_some() {
                    return Err(unexpected);
                }
                self.progress.end = Some(end);
                self.check_counts(0, 0)?;
                self.maybe_complete(actions);
                Ok(())
            }
            Frame::ZeroRun { pass, start, count } if receiving => {
                self.check_pass(pass)?;
                self.layout_checked(|l| l.check_range(start, count))?;
                if state != DestState::Receiving && self.tracks_missing() {
                    self.push_zero(start, count, sink)?;
                    self.maybe_done(actions);
                    return Ok(());
                }
                self.check_counts(0, count)?;
                sink.write_zero(start, count).map_err(DestError::Sink)?;
                self.progress.zero_pages += count;
                self.maybe_complete(actions);
                Ok(())
            }
            Frame::PageBatch(b) if receiving => {
                self.check_pass(b.pass)?;
                self.layout_checked(|l| l.check_range(b.set.first(), b.set.span()))?;
                let n = b.set.len();
                if b.data.len() != n * PAGE_SIZE {
                    return Err(DestError::DataLength {
                        len: b.data.len(),
                        pages: n,
                    });
                }
                if state != DestState::Receiving && self.tracks_missing() {
                    self.push_batch(&b.set, &b.data, sink)?;
                    self.maybe_done(actions);
                    return Ok(());
                }
                self.check_counts(n as u64, 0)?;
                write_batch(sink, &b.set, &b.data)?;
                if let Some(r) = &mut self.received {
                    r.mark(&b.set);
                }
                self.progress.pages += n as u64;
                self.maybe_complete(actions);
                Ok(())
            }
            // Deltas only in pre-copy passes: after a post-copy switchover
            // the destination's copy of a dirty page is gone, not a base.
            Frame::XorPageBatch(b) if state == DestState::Receiving => {
                self.check_pass(b.pass)?;
                self.layout_checked(|l| l.check_range(b.set.first(), b.set.span()))?;
                let Some(received) = &self.received else {
                    return Err(unexpected);
                };
                let n = b.set.len();
                if b.deltas.len() != n * PAGE_SIZE || b.crcs.len() != n {
                    return Err(DestError::DataLength {
                        len: b.deltas.len(),
                        pages: n,
                    });
                }
                self.check_counts(n as u64, 0)?;
                delta::reconstruct(&b, received, sink, &mut self.delta_buf)?;
                write_batch(sink, &b.set, self.delta_buf.as_slice())?;
                self.progress.pages += n as u64;
                self.maybe_complete(actions);
                Ok(())
            }
            Frame::PageReply { id, index, data }
                if state == (DestState::SwitchedOver { postcopy: true }) || late_postcopy =>
            {
                let count = data.len() / PAGE_SIZE;
                match self.requests.get(&id) {
                    Some(&(i, c)) if i == index && c as usize == count => {}
                    _ => return Err(DestError::UnknownRequest { id }),
                }
                if data.len() % PAGE_SIZE != 0 {
                    return Err(DestError::DataLength {
                        len: data.len(),
                        pages: count,
                    });
                }
                self.layout_checked(|l| l.check_range(index, count as u64))?;
                let written = self.install(index, &data, sink)?;
                self.postcopy_stats.pages_from_replies += written;
                self.requests.remove(&id);
                actions.push(DestAction::PageReplyReceived {
                    id,
                    index,
                    count: count as u32,
                });
                self.maybe_done(actions);
                Ok(())
            }
            Frame::State { blob } if state == DestState::Receiving && self.pass_idle() => {
                self.state = DestState::StateReceived;
                actions.push(DestAction::Send(Frame::Ack(AckWhat::State)));
                actions.push(DestAction::StateReceived(blob));
                Ok(())
            }
            Frame::MissingPages { last, ranges } if state == DestState::StateReceived => {
                self.missing_chunk(last, &ranges)
            }
            Frame::Switchover { postcopy } if state == DestState::StateReceived => {
                if postcopy && !self.agreed.contains(Capabilities::POSTCOPY) {
                    return Err(unexpected);
                }
                // A started missing set must be complete, and only
                // post-copy has one.
                if self.tracks_missing() && (!postcopy || !self.missing_complete) {
                    return Err(unexpected);
                }
                self.state = DestState::SwitchedOver { postcopy };
                actions.push(DestAction::SwitchedOver { postcopy });
                Ok(())
            }
            _ => Err(unexpected),
        }
    }

    fn layout_checked(
        &self,
        check: impl FnOnce(&MemoryLayout) -> Result<(), OutOfRange>,
    ) -> Result<(), DestError> {
        match self.layout() {
            Some(l) => Ok(check(l)?),
            // Page frames are only accepted after the hello; keep the
            // check total anyway.
            None => Err(DestError::Failed),
        }
    }

    /// Page frames must belong to the pass after the last completed one.
    fn check_pass(&self, pass: u32) -> Result<(), DestError> {
        if pass == self.progress.pass {
            Ok(())
        } else {
            Err(DestError::WrongPass {
                got: pass,
                expected: self.progress.pass,
            })
        }
    }

    fn pass_idle(&self) -> bool {
        let p = &self.progress;
        p.pages == 0 && p.zero_pages == 0 && p.end.is_none()
    }

    /// Fails if adding these pages would exceed what `PassEnd` announced.
    fn check_counts(&self, pages: u64, zero_pages: u64) -> Result<(), DestError> {
        let p = &self.progress;
        let pages = p.pages.saturating_add(pages);
        let zero_pages = p.zero_pages.saturating_add(zero_pages);
        match p.end {
            Some(end) if pages > end.pages_sent || zero_pages > end.zero_pages => {
                Err(DestError::PassOverflow {
                    pass: p.pass,
                    pages,
                    zero_pages,
                })
            }
            _ => Ok(()),
        }
    }

    fn maybe_complete(&mut self, actions: &mut Vec<DestAction>) {
        let p = &self.progress;
        let Some(end) = p.end else { return };
        if p.pages == end.pages_sent && p.zero_pages == end.zero_pages {
            tracing::debug!(pass = end.pass, pages = end.pages_sent, "pass received");
            actions.push(DestAction::Send(Frame::Ack(AckWhat::Pass(end.pass))));
            actions.push(DestAction::PassComplete(end));
            self.progress = PassProgress {
                pass: end.pass.wrapping_add(1),
                ..PassProgress::default()
            };
        }
    }
}

fn write_batch<S: PageSink + ?Sized, D: PageRuns + ?Sized>(
    sink: &mut S,
    set: &PageSet,
    data: &D,
) -> Result<(), DestError> {
    if let (PageSet::Run { first, .. }, true) = (set, sink.writes_bytes()) {
        // One copy per piece, cut pages included: no gathering. `first`
        // is inside the layout, so this cannot overflow.
        let base = first.0 * PAGE_SIZE as u64;
        return data
            .for_each_piece(|offset, bytes| sink.write_bytes(base + offset as u64, bytes))
            .map_err(DestError::Sink);
    }
    for_each_page_run(set, data, |index, bytes| match set {
        PageSet::Run { .. } => sink.write_pages(index, bytes),
        PageSet::List { .. } => match bytes.first_chunk() {
            Some(page) => sink.write_page(index, page),
            None => Ok(()),
        },
    })
    .map_err(DestError::Sink)
}

/// Calls `f(index, bytes)` for the data of a checked batch (`data` is
/// `set.len()` pages) in whole pages, in order: consecutive pages of a
/// `Run` as they lie in one piece of `data`, the pages of a `List` one by
/// one.
pub(super) fn for_each_page_run<E, D: PageRuns + ?Sized>(
    set: &PageSet,
    data: &D,
    mut f: impl FnMut(PageIndex, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    match set {
        PageSet::Run { first, .. } => {
            data.for_each_run(|page, bytes| f(PageIndex(first.0 + page as u64), bytes))
        }
        PageSet::List { first, offsets } => data.for_each_run(|page, bytes| {
            let pages = bytes.chunks_exact(PAGE_SIZE);
            for (one, &o) in pages.zip(offsets.iter().skip(page)) {
                f(PageIndex(first.0 + u64::from(o)), one)?;
            }
            Ok(())
        }),
    }
}
