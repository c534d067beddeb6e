//! Source side: runs a [`SourceSession`] over a migration's streams.

use bytes::Bytes;
use quinn::SendStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::debug;

use super::reader::{spawn_readers, Inbound};
use super::{DriverError, StreamRole};
use crate::codec::pool::BufferPool;
use crate::codec::{HelloAck, ReasonCode};
use crate::endpoint::SourceStreams;
use crate::layout::PageRange;
use crate::limiter::RateLimiter;
use crate::session::{PageSource, PassStats, SourceError, SourceEvent, SourceSession};

/// Room reserved for one page frame (a full raw batch plus headers), so
/// encoding never reallocates.
const FRAME_CAPACITY: usize = crate::codec::HEADER_LEN + crate::codec::MAX_BATCH_BODY;

/// Spare frame buffers kept: about what QUIC holds unacknowledged on one
/// stream (its 16 MiB receive window is 32 full frames), so that in steady
/// state frames reuse memory instead of faulting fresh pages in.
const POOL_KEEP: usize = 32;

/// Moves a [`SourceSession`]'s frames over the streams of one migration.
///
/// The caller (the migration engine) decides the passes; each method runs
/// one protocol step to completion:
///
/// ```text
/// handshake → send_pass* → switchover(postcopy=false) → Ok  (guest runs there)
///                        → switchover(postcopy=true) → serve_until_done
/// ```
#[derive(Debug)]
pub struct SourceDriver {
    control: SendStream,
    priority: SendStream,
    bulk: Vec<SendStream>,
    next_bulk: usize,
    limiter: RateLimiter,
    inbound: mpsc::Receiver<Inbound>,
    _readers: JoinSet<()>,
    out: Vec<u8>,
    /// Page frame buffers, back from quinn once it no longer needs them.
    pool: BufferPool,
    /// Post-copy requests answered so far.
    served: u64,
}

impl SourceDriver {
    /// Takes over the streams from
    /// [`PeerConnection::open_migration`](crate::endpoint::PeerConnection::open_migration).
    /// Every page frame is charged to `limiter` before it is written.
    pub fn new(streams: SourceStreams, limiter: RateLimiter) -> Self {
        let (inbound, readers) = spawn_readers(vec![
            (StreamRole::Control, streams.control_rx),
            (StreamRole::Priority, streams.priority_rx),
        ]);
        Self {
            control: streams.control_tx,
            priority: streams.priority_tx,
            bulk: streams.bulk,
            next_bulk: 0,
            limiter,
            inbound,
            _readers: readers,
            out: Vec::new(),
            pool: BufferPool::new(POOL_KEEP),
            served: 0,
        }
    }

    /// Sends the hello and waits for the destination's answer.
    pub async fn handshake(
        &mut self,
        session: &mut SourceSession,
        src: &(impl PageSource + ?Sized),
    ) -> Result<HelloAck, DriverError> {
        self.out.clear();
        let r = session.hello(&mut self.out);
        self.check(r).await?;
        self.flush_control().await?;
        match self.next_event(session, src).await? {
            SourceEvent::Accepted(ack) => Ok(ack),
            other => Err(self.unexpected(session, "handshake", other).await),
        }
    }

    /// Runs one pass: `PassBegin`, every page frame spread over the bulk
    /// streams, `PassEnd`, then waits for the destination's `Ack`.
    pub async fn send_pass(
        &mut self,
        session: &mut SourceSession,
        src: &(impl PageSource + ?Sized),
        pages: &[PageRange],
        known_zero: &[PageRange],
    ) -> Result<PassStats, DriverError> {
        self.out.clear();
        let r = session.begin_pass(pages, known_zero, &mut self.out);
        let pass = self.check(r).await?;
        self.flush_control().await?;
        loop {
            // An abort from the destination must stop us mid-pass.
            // Post-copy background passes also serve page requests here.
            if let Ok(inbound) = self.inbound.try_recv() {
                match self.handle_inbound(session, src, inbound).await? {
                    None | Some(SourceEvent::PageServed { .. }) => {}
                    Some(other) => return Err(self.unexpected(session, "send_pass", other).await),
                }
            }
            let mut frame = self.pool.take(FRAME_CAPACITY);
            let r = session.next_frame(src, &mut frame);
            if self.check(r).await?.is_none() {
                break;
            }
            self.limiter.acquire(frame.len() as u64).await;
            let index = self.next_bulk;
            self.next_bulk = (index + 1) % self.bulk.len();
            self.bulk[index]
                .write_chunk(self.pool.bytes(frame))
                .await
                .map_err(|e| DriverError::Transport {
                    stream: StreamRole::Bulk(index as u16),
                    source: e.into(),
                })?;
        }
        self.out.clear();
        let r = session.end_pass(&mut self.out);
        let stats = self.check(r).await?;
        self.flush_control().await?;
        match self.next_event(session, src).await? {
            SourceEvent::PassAcked(p) if p == pass => {
                debug!(pass, pages = stats.pages, "pass acknowledged");
                Ok(stats)
            }
            other => Err(self.unexpected(session, "send_pass", other).await),
        }
    }

    /// Sends the device state and `Switchover`, and waits for the state to
    /// be acknowledged. Pre-copy: then waits for `Done` (the guest runs on
    /// the destination). Post-copy: returns at once; call
    /// [`serve_until_done`](Self::serve_until_done).
    pub async fn switchover(
        &mut self,
        session: &mut SourceSession,
        src: &(impl PageSource + ?Sized),
        state: &[u8],
        postcopy: bool,
    ) -> Result<(), DriverError> {
        self.out.clear();
        let r = session.send_state(state, postcopy, &mut self.out);
        self.check(r).await?;
        self.flush_control().await?;
        match self.next_event(session, src).await? {
            SourceEvent::StateAcked => {}
            other => return Err(self.unexpected(session, "switchover", other).await),
        }
        if postcopy {
            return Ok(());
        }
        match self.next_event(session, src).await? {
            SourceEvent::Done => self.finish_streams(),
            other => Err(self.unexpected(session, "switchover", other).await),
        }
    }

    /// Post-copy: answers page requests on the priority stream until the
    /// destination reports `Done`. Returns the number of requests served
    /// since the switchover (some may have been served while waiting for the
    /// state's ack).
    pub async fn serve_until_done(
        &mut self,
        session: &mut SourceSession,
        src: &(impl PageSource + ?Sized),
    ) -> Result<u64, DriverError> {
        match self.next_event(session, src).await? {
            SourceEvent::Done => {
                self.finish_streams()?;
                Ok(self.served)
            }
            other => Err(self.unexpected(session, "serve_until_done", other).await),
        }
    }

    /// Aborts the migration: tells the destination why and fails the session.
    pub async fn abort(
        &mut self,
        session: &mut SourceSession,
        code: ReasonCode,
        message: &str,
    ) -> Result<(), DriverError> {
        self.out.clear();
        session.abort(code, message, &mut self.out);
        self.flush_control().await
    }

    /// Waits for the next meaningful frame from the destination. Page
    /// requests are answered on the priority stream on the way: once the
    /// state is sent they can arrive at any time, even before the state's
    /// ack (they travel on another stream).
    async fn next_event(
        &mut self,
        session: &mut SourceSession,
        src: &(impl PageSource + ?Sized),
    ) -> Result<SourceEvent, DriverError> {
        loop {
            let inbound = self
                .inbound
                .recv()
                .await
                .unwrap_or(Err(DriverError::StreamsEnded));
            match self.handle_inbound(session, src, inbound).await? {
                None | Some(SourceEvent::PageServed { .. }) => {}
                Some(event) => return Ok(event),
            }
        }
    }

    async fn handle_inbound(
        &mut self,
        session: &mut SourceSession,
        src: &(impl PageSource + ?Sized),
        inbound: Inbound,
    ) -> Result<Option<SourceEvent>, DriverError> {
        let frame = match inbound {
            Ok((_, frame)) => frame,
            Err(e) => {
                // Malformed bytes from the destination: abort with the
                // decoder's reason (best effort).
                if let DriverError::Decode { source, .. } = &e {
                    let _ = self
                        .abort(session, source.reason(), &source.to_string())
                        .await;
                }
                return Err(e);
            }
        };
        self.out.clear();
        let r = session.handle(frame, src, &mut self.out);
        let event = self.check(r).await?;
        if let Some(SourceEvent::PageServed { .. }) = event {
            self.served += 1;
            let reply = Bytes::copy_from_slice(&self.out);
            self.priority
                .write_chunk(reply)
                .await
                .map_err(DriverError::transport(StreamRole::Priority))?;
        }
        Ok(event)
    }

    /// Passes a session result through; on error sends the abort the
    /// session asks for (best effort: the peer may be gone).
    async fn check<T>(&mut self, r: Result<T, SourceError>) -> Result<T, DriverError> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                if let Some(frame) = e.abort_frame() {
                    let mut buf = Vec::new();
                    if frame.encode(&mut buf).is_ok() {
                        let _ = self.control.write_all(&buf).await;
                    }
                }
                Err(e.into())
            }
        }
    }

    /// The destination answered out of turn: abort and say so.
    async fn unexpected(
        &mut self,
        session: &mut SourceSession,
        step: &'static str,
        event: SourceEvent,
    ) -> DriverError {
        let got = format!("{event:?}");
        let _ = self
            .abort(session, ReasonCode::Protocol, &format!("unexpected {got}"))
            .await;
        DriverError::OutOfTurn { step, got }
    }

    async fn flush_control(&mut self) -> Result<(), DriverError> {
        self.control
            .write_all(&self.out)
            .await
            .map_err(|e| DriverError::Transport {
                stream: StreamRole::Control,
                source: e.into(),
            })
    }

    fn finish_streams(&mut self) -> Result<(), DriverError> {
        for (i, s) in self.bulk.iter_mut().enumerate() {
            s.finish().map_err(|e| DriverError::Transport {
                stream: StreamRole::Bulk(i as u16),
                source: e.into(),
            })?;
        }
        self.control
            .finish()
            .map_err(DriverError::transport(StreamRole::Control))?;
        self.priority
            .finish()
            .map_err(DriverError::transport(StreamRole::Priority))
    }
}
