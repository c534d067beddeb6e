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
//! * Post-copy: [`SourceDriver::switchover_postcopy`] hands over the state
//!   and the set of missing pages; [`SourceDriver::serve_until_done`] then
//!   answers `PageRequest`s on the priority stream the moment they arrive
//!   while a push task sends the remaining pages on the bulk streams
//!   (rate-limited, nearest to the latest request first), until `Done`.
//!   The destination sends requests with
//!   [`DestinationDriver::send_page_request`] (no waiting) and takes replies
//!   from the cancel-safe [`DestinationDriver::next_event`], so a fault loop
//!   can `select!` over faults and frames.
//! * Post-copy recovery: when the connection breaks both sessions keep their
//!   state; on a new connection [`SourceDriver::resume`] and
//!   [`DestinationDriver::resume`] exchange a resume hello and the pages still
//!   missing, outstanding requests are sent again, and serving continues.
//!
//! Any error a session reports is sent to the peer as `Abort` (when the
//! session says so) before it is returned. A lost peer surfaces as
//! [`DriverError::Transport`] with [`TransportError::PeerLost`].

mod control;
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
    /// A hello on a resume connection was not a matching resume; the
    /// destination refused it and still waits for one.
    #[error("resume hello refused")]
    ResumeRefused,
}

/// Percentiles of post-copy request round trips (`None` without samples).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyStats {
    /// Requests answered.
    pub samples: u64,
    pub p50: Option<std::time::Duration>,
    pub p99: Option<std::time::Duration>,
    pub max: Option<std::time::Duration>,
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

    /// True when a new connection can cure this error: the link failed
    /// (a stream or the connection broke, the peer went silent, its streams
    /// ended), not the peer's will or its bytes. Post-copy uses it on both
    /// sides to decide between waiting for a redial and failing.
    pub fn is_recoverable(&self) -> bool {
        matches!(
            self,
            DriverError::Transport { .. } | DriverError::StreamsEnded
        )
    }

    fn transport<E: Into<TransportError>>(stream: StreamRole) -> impl FnOnce(E) -> Self {
        move |e| DriverError::Transport {
            stream,
            source: e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_link_failures_are_recoverable() {
        let lost = DriverError::Transport {
            stream: StreamRole::Priority,
            source: TransportError::PeerLost,
        };
        assert!(lost.is_recoverable());
        assert!(DriverError::StreamsEnded.is_recoverable());
        let truncated = DriverError::Truncated {
            stream: StreamRole::Control,
            pending: 3,
        };
        assert!(!truncated.is_recoverable());
        assert!(!DriverError::ResumeRefused.is_recoverable());
        let out_of_turn = DriverError::OutOfTurn {
            step: "resume",
            got: "Done".into(),
        };
        assert!(!out_of_turn.is_recoverable());
    }
}
