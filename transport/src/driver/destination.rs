//! Destination side: feeds a [`DestinationSession`] from a migration's
//! streams.
//!
//! Control frames are written by a task of their own, fed through a bounded
//! queue, so [`DestinationDriver::next_event`] only awaits room in that
//! queue and the inbound queue, and is cancel-safe: a post-copy fault loop
//! can `select!` between it and its fault source and lose nothing.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use quinn::SendStream;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::control::ControlQueue;
use super::reader::{spawn_readers, Inbound, InboundQueue};
use super::{DriverError, LatencyStats, StreamRole};
use crate::codec::{Frame, Hello, PassEnd};
use crate::endpoint::DestinationStreams;
use crate::layout::PageIndex;
use crate::session::{DestAction, DestState, DestinationSession, PageSink};

/// Round-trip samples kept for the latency percentiles (a bound on memory;
/// later samples are dropped).
const MAX_RTT_SAMPLES: usize = 1 << 20;

/// Something only the caller can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestEvent {
    /// Decide: send [`DestinationSession::accept`] or
    /// [`DestinationSession::refuse`] with [`DestinationDriver::send_control`].
    /// (Not produced with `auto_accept`.)
    Hello(Box<Hello>),
    /// Every page of the pass arrived and was written; already acknowledged.
    PassComplete(PassEnd),
    /// The device and vCPU state to restore; already acknowledged.
    State(Vec<u8>),
    /// Restore the state, resume the guest, then call
    /// [`DestinationDriver::resumed`].
    SwitchedOver {
        /// Pages are still missing
        /// ([`DestinationSession::missing_ranges`]): punch them out before
        /// resuming, then turn faults into
        /// [`DestinationDriver::send_page_request`]s.
        postcopy: bool,
    },
    /// A post-copy reply was handled (its still-missing pages written).
    PageReply {
        /// Request id.
        id: u64,
        /// First page.
        index: PageIndex,
        /// Pages in the reply.
        count: u32,
    },
    /// Post-copy: every page is installed and `Done` was sent.
    PostcopyComplete,
}

/// Feeds a [`DestinationSession`] from the streams of one migration.
///
/// ```text
/// loop next_event:
///   Hello          → send_control(session.accept()?)   (unless auto_accept)
///   PassComplete   → progress
///   State(blob)    → keep it
///   SwitchedOver   → restore + resume, resumed(session)
///                    post-copy: select! { fault → send_page_request,
///                                         next_event → PageReply / PostcopyComplete }
/// connection lost in post-copy:
///   session.prepare_resume(); new streams → DestinationDriver::new → resume(session)
/// ```
#[derive(Debug)]
pub struct DestinationDriver {
    control: ControlQueue,
    control_task: Option<JoinHandle<Result<(), DriverError>>>,
    priority: SendStream,
    inbound: InboundQueue,
    _readers: JoinSet<()>,
    events: VecDeque<DestEvent>,
    buf: Vec<u8>,
    /// Send times of unanswered page requests.
    sent_at: HashMap<u64, Instant>,
    /// Request round trips in microseconds.
    rtt_us: Vec<u32>,
}

impl DestinationDriver {
    /// Takes over the streams from
    /// [`PeerConnection::accept_migration`](crate::endpoint::PeerConnection::accept_migration)
    /// and starts one reader task per incoming stream and the control writer.
    pub fn new(streams: DestinationStreams) -> Self {
        let mut incoming = vec![
            (StreamRole::Control, streams.control_rx),
            (StreamRole::Priority, streams.priority_rx),
        ];
        incoming.extend(
            streams
                .bulk
                .into_iter()
                .enumerate()
                .map(|(i, s)| (StreamRole::Bulk(i as u16), s)),
        );
        let (inbound, readers) = spawn_readers(incoming);
        let (control, queue) = ControlQueue::new();
        let control_task = tokio::spawn(write_control(streams.control_tx, queue));
        Self {
            control,
            control_task: Some(control_task),
            priority: streams.priority_tx,
            inbound,
            _readers: readers,
            events: VecDeque::new(),
            buf: Vec::new(),
            sent_at: HashMap::new(),
            rtt_us: Vec::new(),
        }
    }

    /// Runs the session until there is something for the caller. Frames the
    /// session wants sent (acks, hello-ack, `Done`) are queued on the way,
    /// all of them before an event is returned.
    ///
    /// Cancel-safe: it awaits only room in the control queue (a held frame
    /// leaves the held list only with its place) and the inbound queue, and
    /// a frame taken from the latter is handled without awaiting, so
    /// dropping the future (a `select!` arm losing) loses no frame and no
    /// event.
    pub async fn next_event<S: PageSink + ?Sized>(
        &mut self,
        session: &mut DestinationSession,
        sink: &mut S,
    ) -> Result<DestEvent, DriverError> {
        loop {
            if !self.events.is_empty() {
                self.control.release().await;
                if let Some(event) = self.events.pop_front() {
                    return Ok(event);
                }
            }
            self.pump(session, sink).await?;
        }
    }

    /// Queues a frame the caller got from the session (`accept`, `refuse`,
    /// `resumed`) on the control stream. Returns once queued; a failure of
    /// an earlier write is reported here.
    pub async fn send_control(&mut self, frame: &Frame) -> Result<(), DriverError> {
        let mut buf = Vec::new();
        frame
            .encode(&mut buf)
            .map_err(|e| DriverError::Source(e.into()))?;
        self.queue_control(buf).await
    }

    async fn queue_control(&mut self, buf: Vec<u8>) -> Result<(), DriverError> {
        // After the frames the session produced earlier.
        if self.control.send(buf).await.is_ok() {
            return Ok(());
        }
        // The writer stopped: it failed, say why.
        match self.control_task.take() {
            Some(task) => match task.await {
                Ok(Err(e)) => Err(e),
                _ => Err(DriverError::StreamsEnded),
            },
            None => Err(DriverError::StreamsEnded),
        }
    }

    /// The guest runs here: sends [`DestinationSession::resumed`]'s frame
    /// (`Done`, or post-copy `Resumed`, followed by `Done` at once if no page
    /// is missing).
    pub async fn resumed(&mut self, session: &mut DestinationSession) -> Result<(), DriverError> {
        let frame = session.resumed()?;
        self.send_control(&frame).await?;
        if let Some(done) = session.take_done() {
            self.send_control(&done).await?;
            self.events.push_back(DestEvent::PostcopyComplete);
        }
        Ok(())
    }

    /// Post-copy: sends a `PageRequest` for `count` pages from `index` on
    /// the high-priority stream and returns its id without waiting for the
    /// reply (it arrives as [`DestEvent::PageReply`] from `next_event`).
    /// If the connection is gone the request stays outstanding in the
    /// session and is sent again by [`resume`](Self::resume).
    pub async fn send_page_request(
        &mut self,
        session: &mut DestinationSession,
        index: PageIndex,
        count: u32,
    ) -> Result<u64, DriverError> {
        let frame = session.request_pages(index, count)?;
        let Frame::PageRequest { id, .. } = frame else {
            // The session hands out `PageRequest`s only.
            return Err(DriverError::OutOfTurn {
                step: "send_page_request",
                got: format!("{:?}", frame.frame_type()),
            });
        };
        self.sent_at.insert(id, Instant::now());
        self.write_priority(&frame).await?;
        Ok(id)
    }

    async fn write_priority(&mut self, frame: &Frame) -> Result<(), DriverError> {
        self.buf.clear();
        frame
            .encode(&mut self.buf)
            .map_err(|e| DriverError::Source(e.into()))?;
        self.priority
            .write_all(&self.buf)
            .await
            .map_err(|e| DriverError::Transport {
                stream: StreamRole::Priority,
                source: e.into(),
            })
    }

    /// Post-copy: asks for pages and returns once they are handled (the
    /// sequential form of [`send_page_request`](Self::send_page_request)).
    /// Other events that arrive meanwhile are kept for `next_event`.
    pub async fn request_pages<S: PageSink + ?Sized>(
        &mut self,
        session: &mut DestinationSession,
        sink: &mut S,
        index: PageIndex,
        count: u32,
    ) -> Result<(), DriverError> {
        let wanted = self.send_page_request(session, index, count).await?;
        loop {
            let before = self.events.len();
            self.pump(session, sink).await?;
            let answered = self
                .events
                .iter()
                .skip(before)
                .position(|e| matches!(e, DestEvent::PageReply { id, .. } if *id == wanted));
            if let Some(pos) = answered {
                self.events.remove(before + pos);
                self.control.release().await;
                return Ok(());
            }
        }
    }

    /// Post-copy resume on a new connection: `session` must have been put in
    /// [`DestState::AwaitResume`] with
    /// [`DestinationSession::prepare_resume`]. Waits for the source's resume
    /// hello, answers it with the pages still missing, sends the unanswered
    /// requests again and returns the missing count. A hello that is not a
    /// matching resume is refused ([`DriverError::ResumeRefused`]); the
    /// session then still waits for a proper one.
    pub async fn resume<S: PageSink + ?Sized>(
        &mut self,
        session: &mut DestinationSession,
        sink: &mut S,
    ) -> Result<u64, DriverError> {
        loop {
            if session.state() != DestState::AwaitResume {
                return Err(DriverError::OutOfTurn {
                    step: "resume",
                    got: format!("{:?}", session.state()),
                });
            }
            if let Some(missing) = self.pump(session, sink).await? {
                // The hello-ack and missing set go out before the requests.
                self.control.release().await;
                for frame in session.outstanding_requests() {
                    if let Frame::PageRequest { id, .. } = frame {
                        // Keep the first send time: the fault waited since.
                        self.sent_at.entry(id).or_insert_with(Instant::now);
                    }
                    self.write_priority(&frame).await?;
                }
                return Ok(missing);
            }
            if session.state() == DestState::AwaitResume {
                return Err(DriverError::ResumeRefused);
            }
        }
    }

    /// Round-trip latency of the page requests answered so far (request
    /// sent to reply handled), measured here.
    pub fn request_latency(&self) -> LatencyStats {
        LatencyStats::from_micros(&self.rtt_us)
    }

    /// Handles one inbound frame, queueing the events it produced; returns
    /// the missing count if the frame was an accepted resume hello. No await
    /// after the frame is taken (see `next_event`).
    async fn pump<S: PageSink + ?Sized>(
        &mut self,
        session: &mut DestinationSession,
        sink: &mut S,
    ) -> Result<Option<u64>, DriverError> {
        // What the previous frame produced is queued before the next is
        // taken (see the control module).
        self.control.release().await;
        let inbound = self
            .inbound
            .recv()
            .await
            .unwrap_or(Err(DriverError::StreamsEnded));
        self.handle(session, sink, inbound)
    }

    fn handle<S: PageSink + ?Sized>(
        &mut self,
        session: &mut DestinationSession,
        sink: &mut S,
        inbound: Inbound,
    ) -> Result<Option<u64>, DriverError> {
        let frame = match inbound {
            Ok((_, frame)) => frame,
            Err(e) => {
                // Malformed bytes from the source: fail the session and
                // tell the source why (best effort).
                if let DriverError::Decode { source, .. } = &e {
                    let abort = session.refuse(source.reason(), &source.to_string());
                    self.queue_now(&abort);
                }
                return Err(e);
            }
        };
        let actions = match session.handle(frame, sink) {
            Ok(actions) => actions,
            Err(e) => {
                if let Some(abort) = e.abort_frame() {
                    self.queue_now(&abort);
                }
                return Err(e.into());
            }
        };
        let mut resumed = None;
        for action in actions {
            match action {
                DestAction::Send(frame) => self.queue_now(&frame),
                DestAction::HelloReceived(h) => self.events.push_back(DestEvent::Hello(h)),
                DestAction::PassComplete(end) => {
                    self.events.push_back(DestEvent::PassComplete(end))
                }
                DestAction::StateReceived(blob) => self.events.push_back(DestEvent::State(blob)),
                DestAction::SwitchedOver { postcopy } => {
                    self.events.push_back(DestEvent::SwitchedOver { postcopy })
                }
                DestAction::PageReplyReceived { id, index, count } => {
                    if let Some(t) = self.sent_at.remove(&id) {
                        if self.rtt_us.len() < MAX_RTT_SAMPLES {
                            let us = t.elapsed().as_micros().min(u128::from(u32::MAX));
                            self.rtt_us.push(us as u32);
                        }
                    }
                    self.events
                        .push_back(DestEvent::PageReply { id, index, count })
                }
                DestAction::ResumeAccepted { missing } => resumed = Some(missing),
                DestAction::PostcopyComplete => self.events.push_back(DestEvent::PostcopyComplete),
            }
        }
        Ok(resumed)
    }

    /// Queues a frame for the control writer without waiting. A writer that
    /// already failed shows up on the next `send_control` or as a stream
    /// error from the readers.
    fn queue_now(&mut self, frame: &Frame) {
        let mut buf = Vec::new();
        if frame.encode(&mut buf).is_ok() {
            self.control.push_now(buf);
        }
    }
}

/// Writes queued control frames in order until the driver is dropped, then
/// finishes the stream.
async fn write_control(
    mut stream: SendStream,
    mut queue: mpsc::Receiver<Vec<u8>>,
) -> Result<(), DriverError> {
    while let Some(buf) = queue.recv().await {
        stream
            .write_all(&buf)
            .await
            .map_err(DriverError::transport(StreamRole::Control))?;
    }
    let _ = stream.finish();
    Ok(())
}

impl LatencyStats {
    fn from_micros(samples: &[u32]) -> Self {
        let mut v = samples.to_vec();
        v.sort_unstable();
        let at = |q: f64| -> Option<Duration> {
            let i = ((v.len() as f64 - 1.0) * q).round() as usize;
            v.get(i).map(|&us| Duration::from_micros(u64::from(us)))
        };
        LatencyStats {
            samples: v.len() as u64,
            p50: at(0.50),
            p99: at(0.99),
            max: v.last().map(|&us| Duration::from_micros(u64::from(us))),
        }
    }
}
