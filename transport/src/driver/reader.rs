//! Reads one stream, cuts it into frames and forwards them to the session's
//! task. Runs as its own task per stream, so decoding (CRC32, zstd) of
//! different streams proceeds in parallel.

use quinn::RecvStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{DriverError, StreamRole};
use crate::codec::{Frame, FrameBuffer};
use crate::endpoint::TransportError;

/// A frame, or the reason a stream stopped producing them.
pub(crate) type Inbound = Result<(StreamRole, Frame), DriverError>;

/// Frames buffered between the reader tasks and the session. Bounded so a
/// slow sink pushes back through QUIC flow control instead of growing memory
/// (at most this many frames of at most one batch each).
pub(crate) const INBOUND_FRAMES: usize = 64;

/// Frames from the reader tasks: control and post-copy frames in one
/// queue, page frames of the bulk streams in another, so that a reply a
/// vCPU waits for never queues behind a backlog of pushed pages.
#[derive(Debug)]
pub(crate) struct InboundQueue {
    urgent: mpsc::Receiver<Inbound>,
    bulk: mpsc::Receiver<Inbound>,
}

impl InboundQueue {
    /// The next frame, control and priority streams first; `None` once
    /// every stream has ended. Cancel-safe (both receivers are).
    pub(crate) async fn recv(&mut self) -> Option<Inbound> {
        tokio::select! {
            biased;
            Some(x) = self.urgent.recv() => Some(x),
            Some(x) = self.bulk.recv() => Some(x),
            else => None,
        }
    }

    /// A frame that is already waiting, urgent ones first.
    pub(crate) fn try_recv(&mut self) -> Option<Inbound> {
        self.urgent
            .try_recv()
            .or_else(|_| self.bulk.try_recv())
            .ok()
    }
}

/// Spawns one reader task per stream, feeding the queue; it ends once
/// every stream has ended.
pub(crate) fn spawn_readers(streams: Vec<(StreamRole, RecvStream)>) -> (InboundQueue, JoinSet<()>) {
    let (urgent_tx, urgent) = mpsc::channel(INBOUND_FRAMES);
    let (bulk_tx, bulk) = mpsc::channel(INBOUND_FRAMES);
    let mut tasks = JoinSet::new();
    for (role, stream) in streams {
        let tx = match role {
            StreamRole::Bulk(_) => bulk_tx.clone(),
            _ => urgent_tx.clone(),
        };
        tasks.spawn(read_frames(stream, role, tx));
    }
    (InboundQueue { urgent, bulk }, tasks)
}

async fn read_frames(mut stream: RecvStream, role: StreamRole, out: mpsc::Sender<Inbound>) {
    let mut buf = FrameBuffer::new();
    loop {
        loop {
            let item = match buf.next_frame() {
                Ok(Some(frame)) => Ok((role, frame)),
                Ok(None) => break,
                Err(source) => Err(DriverError::Decode {
                    stream: role,
                    source,
                }),
            };
            let failed = item.is_err();
            if out.send(item).await.is_err() || failed {
                // Dropping the stream tells the peer we stopped reading.
                return;
            }
        }
        match stream.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => buf.push_chunk(chunk.bytes),
            Ok(None) => {
                if buf.pending() > 0 {
                    let _ = out
                        .send(Err(DriverError::Truncated {
                            stream: role,
                            pending: buf.pending(),
                        }))
                        .await;
                }
                return;
            }
            Err(e) => {
                let _ = out
                    .send(Err(DriverError::Transport {
                        stream: role,
                        source: TransportError::from(e),
                    }))
                    .await;
                return;
            }
        }
    }
}
