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

/// Spawns one reader task per stream, all feeding one queue. The queue
/// closes once every stream has ended.
pub(crate) fn spawn_readers(
    streams: Vec<(StreamRole, RecvStream)>,
) -> (mpsc::Receiver<Inbound>, JoinSet<()>) {
    let (tx, rx) = mpsc::channel(INBOUND_FRAMES);
    let mut tasks = JoinSet::new();
    for (role, stream) in streams {
        tasks.spawn(read_frames(stream, role, tx.clone()));
    }
    (rx, tasks)
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
