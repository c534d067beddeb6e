//! Source side: runs a [`SourceSession`] over a migration's streams.

use std::time::Instant;

use bytes::Bytes;
use quinn::SendStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::debug;

use super::reader::{spawn_readers, Inbound, InboundQueue};
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

/// Push frames queued ahead of the bulk writer. Small, so that a request
/// moves the push cursor for nearly everything not yet sent.
const PUSH_QUEUE: usize = 2;

/// Moves a [`SourceSession`]'s frames over the streams of one migration.
///
/// The caller (the migration engine) decides the passes; each method runs
/// one protocol step to completion:
///
/// ```text
/// handshake → send_pass* → switchover(postcopy=false) → Ok  (guest runs there)
///                        → switchover_postcopy(state, missing) → serve_until_done
/// post-copy connection lost (DriverError::is_peer_lost or any transport error):
///   new connection, open_migration(same id) → SourceDriver::new → resume → serve_until_done
/// ```
#[derive(Debug)]
pub struct SourceDriver {
    control: SendStream,
    priority: SendStream,
    bulk: Vec<SendStream>,
    next_bulk: usize,
    limiter: RateLimiter,
    inbound: InboundQueue,
    _readers: JoinSet<()>,
    out: Vec<u8>,
    /// Page frame buffers, back from quinn once it no longer needs them.
    pool: BufferPool,
    /// Post-copy requests answered so far.
    served: u64,
    /// When the destination reported the guest resumed (post-copy).
    resumed_at: Option<Instant>,
    /// Told the moment `Resumed` arrives (see `watch_resumed`).
    resumed_tx: Option<tokio::sync::oneshot::Sender<Instant>>,
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
            resumed_at: None,
            resumed_tx: None,
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
            if let Some(inbound) = self.inbound.try_recv() {
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

    /// Post-copy switchover: sends the state, the pages the destination
    /// must fetch (`missing`, sorted ranges) and `Switchover{postcopy}`, and
    /// waits for the state's ack. Then call
    /// [`serve_until_done`](Self::serve_until_done).
    pub async fn switchover_postcopy(
        &mut self,
        session: &mut SourceSession,
        src: &(impl PageSource + ?Sized),
        state: &[u8],
        missing: &[PageRange],
    ) -> Result<(), DriverError> {
        self.out.clear();
        let r = session.send_state_postcopy(state, missing, &mut self.out);
        self.check(r).await?;
        self.flush_control().await?;
        match self.next_event(session, src).await? {
            SourceEvent::StateAcked => Ok(()),
            other => Err(self.unexpected(session, "switchover_postcopy", other).await),
        }
    }

    /// Post-copy, on a new connection to the same destination (streams
    /// opened with the same [`MigrationId`](crate::endpoint::MigrationId)):
    /// sends the resume hello and waits for the destination's missing set,
    /// which becomes the push set. Returns the missing page count; then call
    /// [`serve_until_done`](Self::serve_until_done) again. A refusal fails
    /// the session (the destination does not hold this migration).
    pub async fn resume(
        &mut self,
        session: &mut SourceSession,
        src: &(impl PageSource + ?Sized),
    ) -> Result<u64, DriverError> {
        self.out.clear();
        let r = session.resume(&mut self.out);
        self.check(r).await?;
        self.flush_control().await?;
        match self.next_event(session, src).await? {
            SourceEvent::ResumeAccepted { missing } => Ok(missing),
            other => Err(self.unexpected(session, "resume", other).await),
        }
    }

    /// When the destination reported the guest running (post-copy
    /// `Resumed`; for the switchover downtime, pause → this instant).
    pub fn resumed_at(&self) -> Option<Instant> {
        self.resumed_at
    }

    /// A receiver told the moment the destination reports the guest
    /// running, while [`serve_until_done`](Self::serve_until_done) still
    /// runs (so the caller can record it at once).
    pub fn watch_resumed(&mut self) -> tokio::sync::oneshot::Receiver<Instant> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        match self.resumed_at {
            Some(at) => {
                let _ = tx.send(at);
            }
            None => self.resumed_tx = Some(tx),
        }
        rx
    }

    /// Post-copy: answers page requests on the priority stream as soon as
    /// they arrive while pushing the remaining pages on the bulk streams
    /// (rate-limited by the migration's limiter; requests are not), until
    /// the destination reports `Done`. Returns the number of requests
    /// served by this driver.
    ///
    /// On a transport error the session keeps its state: reconnect and
    /// [`resume`](Self::resume).
    pub async fn serve_until_done(
        &mut self,
        session: &mut SourceSession,
        src: &(impl PageSource + ?Sized),
    ) -> Result<u64, DriverError> {
        let (queue, frames) = mpsc::channel(PUSH_QUEUE);
        let bulk = std::mem::take(&mut self.bulk);
        let mut writer = tokio::spawn(write_push(bulk, self.limiter.clone(), frames));
        let served = self.serve_and_push(session, src, queue).await;
        let pushed = match served {
            // Done: the destination holds every page, frames still queued
            // are moot (and its streams may already be gone).
            Ok(true) => {
                writer.abort();
                Ok(())
            }
            // The push writer stopped: it failed, say why.
            Ok(false) => match (&mut writer).await {
                Ok(Err(e)) => Err(e),
                _ => Err(DriverError::StreamsEnded),
            },
            Err(e) => {
                writer.abort();
                Err(e)
            }
        };
        pushed?;
        let (control, priority) = (self.control.finish(), self.priority.finish());
        control.map_err(DriverError::transport(StreamRole::Control))?;
        priority.map_err(DriverError::transport(StreamRole::Priority))?;
        Ok(self.served)
    }

    /// The post-copy loop; `Ok(true)` on `Done`, `Ok(false)` when the push
    /// writer went away.
    async fn serve_and_push(
        &mut self,
        session: &mut SourceSession,
        src: &(impl PageSource + ?Sized),
        queue: mpsc::Sender<Bytes>,
    ) -> Result<bool, DriverError> {
        let mut pushing = true;
        loop {
            tokio::select! {
                // Requests first: a faulting vCPU never waits for the push.
                biased;
                inbound = self.inbound.recv() => {
                    let inbound = inbound.unwrap_or(Err(DriverError::StreamsEnded));
                    match self.handle_inbound(session, src, inbound).await? {
                        None | Some(SourceEvent::PageServed { .. }) => {}
                        Some(SourceEvent::Resumed) => {
                            let now = Instant::now();
                            self.resumed_at = Some(now);
                            if let Some(tx) = self.resumed_tx.take() {
                                let _ = tx.send(now);
                            }
                        }
                        Some(SourceEvent::Done) => return Ok(true),
                        Some(other) => {
                            return Err(self.unexpected(session, "serve_until_done", other).await)
                        }
                    }
                }
                permit = queue.reserve(), if pushing => {
                    let Ok(permit) = permit else { return Ok(false) };
                    let mut frame = self.pool.take(FRAME_CAPACITY);
                    let r = session.next_push_frame(src, &mut frame);
                    match self.check(r).await? {
                        Some(_) => permit.send(self.pool.bytes(frame)),
                        None => pushing = false,
                    }
                }
            }
        }
    }

    /// Post-copy, after [`serve_until_done`](Self::serve_until_done):
    /// waits up to `within` for the destination's
    /// [`PostcopyReport`](crate::codec::PostcopyReport) (fault latency and
    /// its check of the pages received). `None` if none came: an older
    /// peer, or the connection went.
    pub async fn postcopy_report(
        &mut self,
        session: &mut SourceSession,
        src: &(impl PageSource + ?Sized),
        within: std::time::Duration,
    ) -> Option<crate::codec::PostcopyReport> {
        let wait = async {
            loop {
                let inbound = self.inbound.recv().await?;
                match self.handle_inbound(session, src, inbound).await {
                    Ok(Some(SourceEvent::Report(r))) => return Some(r),
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
        };
        tokio::time::timeout(within, wait).await.ok().flatten()
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

/// The post-copy push writer: charges each frame to the limiter, then writes
/// it to the next bulk stream. Ends when the queue closes or a write fails.
async fn write_push(
    mut bulk: Vec<SendStream>,
    limiter: RateLimiter,
    mut frames: mpsc::Receiver<Bytes>,
) -> Result<(), DriverError> {
    let mut next = 0;
    while let Some(frame) = frames.recv().await {
        limiter.acquire(frame.len() as u64).await;
        let Some(stream) = bulk.get_mut(next) else {
            return Err(DriverError::StreamsEnded);
        };
        stream
            .write_chunk(frame)
            .await
            .map_err(DriverError::transport(StreamRole::Bulk(next as u16)))?;
        next = (next + 1) % bulk.len();
    }
    for (i, s) in bulk.iter_mut().enumerate() {
        s.finish()
            .map_err(DriverError::transport(StreamRole::Bulk(i as u16)))?;
    }
    Ok(())
}
