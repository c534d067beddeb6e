//! Destination side: feeds a [`DestinationSession`] from a migration's
//! streams.

use std::collections::VecDeque;

use quinn::SendStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::reader::{spawn_readers, Inbound};
use super::{DriverError, StreamRole};
use crate::codec::{Frame, Hello, PassEnd};
use crate::endpoint::DestinationStreams;
use crate::layout::PageIndex;
use crate::session::{DestAction, DestinationSession, PageSink};

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
    /// Restore the state, resume the guest, then send
    /// [`DestinationSession::resumed`]'s `Done` with
    /// [`DestinationDriver::send_control`].
    SwitchedOver {
        /// Pages are still missing: fetch them with
        /// [`DestinationDriver::request_pages`] on fault.
        postcopy: bool,
    },
    /// A post-copy reply was written (for a request made by someone else
    /// than [`DestinationDriver::request_pages`]).
    PageReply {
        /// Request id.
        id: u64,
        /// First page.
        index: PageIndex,
        /// Pages written.
        count: u32,
    },
}

/// Feeds a [`DestinationSession`] from the streams of one migration.
///
/// ```text
/// loop next_event:
///   Hello          → send_control(session.accept()?)   (unless auto_accept)
///   PassComplete   → progress
///   State(blob)    → keep it
///   SwitchedOver   → restore + resume, send_control(session.resumed()?), done
///                    (post-copy: request_pages on faults, next_event for the rest)
/// ```
#[derive(Debug)]
pub struct DestinationDriver {
    control: SendStream,
    priority: SendStream,
    inbound: mpsc::Receiver<Inbound>,
    _readers: JoinSet<()>,
    events: VecDeque<DestEvent>,
    buf: Vec<u8>,
}

impl DestinationDriver {
    /// Takes over the streams from
    /// [`PeerConnection::accept_migration`](crate::endpoint::PeerConnection::accept_migration)
    /// and starts one reader task per incoming stream.
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
        Self {
            control: streams.control_tx,
            priority: streams.priority_tx,
            inbound,
            _readers: readers,
            events: VecDeque::new(),
            buf: Vec::new(),
        }
    }

    /// Runs the session until there is something for the caller. Frames the
    /// session wants sent (acks, hello-ack) are sent on the way.
    pub async fn next_event<S: PageSink + ?Sized>(
        &mut self,
        session: &mut DestinationSession,
        sink: &mut S,
    ) -> Result<DestEvent, DriverError> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(event);
            }
            self.pump(session, sink).await?;
        }
    }

    /// Sends a frame the caller got from the session (`accept`, `refuse`,
    /// `resumed`) on the control stream.
    pub async fn send_control(&mut self, frame: &Frame) -> Result<(), DriverError> {
        self.buf.clear();
        frame
            .encode(&mut self.buf)
            .map_err(|e| DriverError::Source(e.into()))?;
        self.control
            .write_all(&self.buf)
            .await
            .map_err(|e| DriverError::Transport {
                stream: StreamRole::Control,
                source: e.into(),
            })
    }

    /// Post-copy: asks the source for `count` pages from `index` on the
    /// high-priority stream and returns once they are written to `sink`.
    /// Other events that arrive meanwhile are kept for `next_event`.
    pub async fn request_pages<S: PageSink + ?Sized>(
        &mut self,
        session: &mut DestinationSession,
        sink: &mut S,
        index: PageIndex,
        count: u32,
    ) -> Result<(), DriverError> {
        let frame = session.request_pages(index, count)?;
        // The session hands out `PageRequest`s only; anything else would be
        // a session bug, reported rather than sent.
        let Frame::PageRequest { id: wanted, .. } = frame else {
            return Err(DriverError::OutOfTurn {
                step: "request_pages",
                got: format!("{:?}", frame.frame_type()),
            });
        };
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
            })?;
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
                return Ok(());
            }
        }
    }

    /// Handles one inbound frame, queueing the events it produced.
    async fn pump<S: PageSink + ?Sized>(
        &mut self,
        session: &mut DestinationSession,
        sink: &mut S,
    ) -> Result<(), DriverError> {
        let inbound = self
            .inbound
            .recv()
            .await
            .unwrap_or(Err(DriverError::StreamsEnded));
        let frame = match inbound {
            Ok((_, frame)) => frame,
            Err(e) => {
                // Malformed bytes from the source: fail the session and
                // tell the source why (best effort).
                if let DriverError::Decode { source, .. } = &e {
                    let abort = session.refuse(source.reason(), &source.to_string());
                    let _ = self.send_control(&abort).await;
                }
                return Err(e);
            }
        };
        let actions = match session.handle(frame, sink) {
            Ok(actions) => actions,
            Err(e) => {
                if let Some(abort) = e.abort_frame() {
                    let _ = self.send_control(&abort).await;
                }
                return Err(e.into());
            }
        };
        for action in actions {
            match action {
                DestAction::Send(frame) => self.send_control(&frame).await?,
                DestAction::HelloReceived(h) => self.events.push_back(DestEvent::Hello(h)),
                DestAction::PassComplete(end) => {
                    self.events.push_back(DestEvent::PassComplete(end))
                }
                DestAction::StateReceived(blob) => self.events.push_back(DestEvent::State(blob)),
                DestAction::SwitchedOver { postcopy } => {
                    self.events.push_back(DestEvent::SwitchedOver { postcopy })
                }
                DestAction::PageReplyReceived { id, index, count } => self
                    .events
                    .push_back(DestEvent::PageReply { id, index, count }),
            }
        }
        Ok(())
    }
}
