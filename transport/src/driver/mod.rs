//! The thin async layer that runs the sans-IO sessions over a
//! [`PeerConnection`](crate::endpoint::PeerConnection)'s streams.
//!
//! The sessions decide what to send; the driver only moves bytes:
//!
//! * [`SourceDriver`] writes the session's control frames (hello, pass
//!   begin/end, state, switchover) to the control stream and its page frames
//!   round-robin over the bulk streams, each page frame charged to the
//!   migration's [`RateLimiter`](crate::limiter::RateLimiter) first. It waits
//!   only at pass boundaries (for the destination's `Ack`), never per frame:
//!   QUIC flow control does the pacing.
//! * [`DestinationDriver`] reads every stream in its own task (decoding,
//!   CRC and decompression run there), merges the frames into one queue and
//!   feeds them to the session in arrival order, sending whatever the session
//!   asks for on the control stream and handing the caller the events only it
//!   can act on (accept the hello, restore state, resume).
//! * Post-copy: [`DestinationDriver::request_pages`] sends a `PageRequest` on
//!   the high-priority stream and returns when its reply is written;
//!   [`SourceDriver::serve_until_done`] answers requests until `Done`.
//!
//! Any error a session reports is sent to the peer as `Abort` (when the
//! session says so) before it is returned. A lost peer surfaces as
//! [`DriverError::Transport`] with [`TransportError::PeerLost`].

mod destination;
mod reader;
mod source;

pub use destination::{DestEvent, DestinationDriver};
pub use source::SourceDriver;

use crate::codec::DecodeError;
use crate::endpoint::TransportError;
use crate::session::{DestError, SourceError};

/// Which stream of a migration something happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRole {
    /// The control stream.
    Control,
    /// The post-copy request/reply stream.
    Priority,
    /// Bulk page stream number `n`.
    Bulk(u16),
}

impl std::fmt::Display for StreamRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamRole::Control => f.write_str("control stream"),
            StreamRole::Priority => f.write_str("post-copy stream"),
            StreamRole::Bulk(n) => write!(f, "bulk stream {n}"),
        }
    }
}

/// Driving a migration over the network failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The connection or a stream failed (including `PeerLost`).
    #[error("transport failed on {stream}")]
    Transport {
        /// Where it failed.
        stream: StreamRole,
        /// Why.
        #[source]
        source: TransportError,
    },
    /// The peer sent bytes that are not a valid frame.
    #[error("malformed frame on {stream}")]
    Decode {
        /// Where they came from.
        stream: StreamRole,
        /// What was wrong.
        #[source]
        source: DecodeError,
    },
    /// A stream ended in the middle of a frame.
    #[error("{stream} ended inside a frame ({pending} bytes left)")]
    Truncated {
        /// Which stream.
        stream: StreamRole,
        /// Bytes of the incomplete frame.
        pending: usize,
    },
    /// Every stream from the peer ended while the session still expected
    /// frames.
    #[error("peer ended its streams")]
    StreamsEnded,
    /// The peer answered out of turn (the migration was aborted).
    #[error("peer sent {got} during {step}")]
    OutOfTurn {
        /// The protocol step that was running.
        step: &'static str,
        /// What arrived instead.
        got: String,
    },
    /// The source session refused to go on.
    #[error("source session failed")]
    Source(#[from] SourceError),
    /// The destination session refused to go on.
    #[error("destination session failed")]
    Destination(#[from] DestError),
}

impl DriverError {
    /// True when the peer went silent for the whole keepalive window.
    pub fn is_peer_lost(&self) -> bool {
        matches!(
            self,
            DriverError::Transport {
                source: TransportError::PeerLost,
                ..
            }
        )
    }

    fn transport<E: Into<TransportError>>(stream: StreamRole) -> impl FnOnce(E) -> Self {
        move |e| DriverError::Transport {
            stream,
            source: e.into(),
        }
    }
}
