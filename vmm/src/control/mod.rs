//! The control socket between the daemon (or `migratectl`-like tools and
//! tests) and one VMM process: a unix stream socket carrying JSON requests
//! and replies, with a binary attachment (dirty bitmap, state blob) and,
//! for `GetMemory` and `Userfaultfd`, an fd passed with SCM_RIGHTS. Byte layouts
//! and the request list are in `vmm/CONTROL.md`.
//!
//! ```text
//! client                                   VMM (serve: one thread per connection)
//!   │ [json_len u32][att_len u32][json][att] │
//!   │ ─────────────── Request ─────────────▶ │ caps checked on the header,
//!   │                                        │ before any allocation
//!   │ ◀────────────── Reply ──────────────── │ (+ SCM_RIGHTS fd on GetMemory)
//!   │              ... repeat ...            │
//! ```
//!
//! Receiver states per connection: `AwaitHeader` → `AwaitBody{json_len,
//! att_len}` → handle → `AwaitHeader`. A header over the caps gets an
//! `Error{too_large}` and the connection is closed (the body cannot be
//! skipped safely); JSON that does not parse gets `Error{bad_request}` and
//! the connection stays usable; end of stream inside a frame gets
//! `Error{truncated}` if the peer still reads, then the connection is
//! closed. The VMM keeps running in every case.
//!
//! This module is sans-IO: [`FrameHeader`], [`encode_frame`] and
//! [`decode_frame`] are pure; `server` and `client` are the thin blocking
//! drivers.

mod client;
mod server;

use guestmem::{DirtyBitmap, MemoryLayout, PagerRegion};
use serde::{Deserialize, Serialize};
use std::os::fd::OwnedFd;

use crate::state::VmState;
use crate::workload::{GuestLayout, VcpuCounters};

pub use client::{read_reply, write_request, CallError, ControlClient};
pub use server::{serve, serve_connection, ControlHandler};

/// How long one control call may block the daemon: every call is quick for
/// a live VMM (restore of a full state blob included), so one that takes
/// this long means the VMM is wedged.
pub const VMM_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Bytes of the frame header: json length and attachment length, u32 LE.
pub const FRAME_HEADER_LEN: usize = 8;
/// Cap on the JSON part of a frame.
pub const MAX_JSON_LEN: u32 = 64 * 1024;
/// Cap on the attachment: the largest thing attached is a state blob.
/// (Dirty bitmaps are 32 KiB per GiB of guest RAM, far below it.)
pub const MAX_ATTACHMENT_LEN: u32 = VmState::MAX_BYTES as u32;

/// A request from the client. JSON: `{"op":"throttle","pct":80}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Pause,
    Resume,
    /// Percentage of each time slice the vCPUs sleep, 0 (off) ..= 99.
    Throttle {
        pct: u8,
    },
    DirtyLogStart,
    /// Fetch-and-clear: pages dirtied since the previous fetch (or start).
    DirtyLogFetch,
    DirtyLogStop,
    /// Only while paused; the reply's attachment is a [`VmState`] blob.
    SaveState,
    /// The reply carries the guest memfd and its layout.
    GetMemory,
    /// The attachment is a [`VmState`] blob; only in `restore --wait-state`.
    Restore,
    /// Post-copy: register guest RAM with a userfaultfd (first call, in
    /// `restore --wait-state` before Restore) and pass a dup of it with
    /// where each region lives in the VMM. Later calls pass another dup of
    /// the same fd (re-attach after a daemon restart).
    Userfaultfd,
    /// Post-copy is over (every page installed): the VMM closes its own
    /// copy of the userfaultfd, so registration ends when the daemon
    /// closes its copy.
    UserfaultfdRelease,
    Shutdown,
}

impl Request {
    /// The JSON tag, for messages and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Throttle { .. } => "throttle",
            Request::DirtyLogStart => "dirty_log_start",
            Request::DirtyLogFetch => "dirty_log_fetch",
            Request::DirtyLogStop => "dirty_log_stop",
            Request::SaveState => "save_state",
            Request::GetMemory => "get_memory",
            Request::Restore => "restore",
            Request::Userfaultfd => "userfaultfd",
            Request::UserfaultfdRelease => "userfaultfd_release",
            Request::Shutdown => "shutdown",
        }
    }

    /// Whether this request carries an attachment.
    pub fn takes_attachment(&self) -> bool {
        matches!(self, Request::Restore)
    }
}

/// The JSON part of a reply. JSON: `{"reply":"error","code":"not_paused",..}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    Ok,
    Status(VmStatus),
    /// Attachment: `DirtyBitmap::to_bytes` over `pages` page indexes.
    Bitmap {
        pages: u64,
    },
    /// Attachment: a [`VmState`] blob.
    State,
    /// Comes with the memfd as SCM_RIGHTS ancillary data.
    Memory {
        layout: MemoryLayout,
    },
    /// Comes with the userfaultfd as SCM_RIGHTS ancillary data.
    Userfaultfd {
        regions: Vec<PagerRegion>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// Stable error codes: callers branch on these, never on the message.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request did not parse, or carried an attachment it must not.
    BadRequest,
    /// A frame length is over its cap.
    TooLarge,
    /// The stream ended inside a frame.
    Truncated,
    /// A field is out of range (e.g. throttle pct > 99).
    InvalidArgument,
    /// The request is not allowed in the current run state (e.g. SaveState
    /// while running, Restore when not waiting for state).
    WrongState,
    /// The state blob was refused (corrupt, wrong version, wrong layout).
    BadState,
    /// This VMM cannot do that (e.g. a KVM capability is missing).
    Unsupported,
    /// A KVM or OS call failed inside the VMM.
    Internal,
    /// A code this build does not know (sent by a newer VMM).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Truncated => "truncated",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::WrongState => "wrong_state",
            ErrorCode::BadState => "bad_state",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lifecycle of the VMM as reported by Status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RunState {
    /// Set up, vCPUs not started yet (`run --paused` stays here until Resume).
    Created,
    Running,
    Paused,
    /// `restore --wait-state`: no guest yet, waiting for a Restore request.
    WaitingForState,
    ShuttingDown,
    Crashed {
        reason: String,
    },
}

/// What Status reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub run_state: RunState,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// 0 = not throttled.
    pub throttle_pct: u8,
    pub dirty_logging: bool,
    /// Read from guest RAM: authoritative, survives save/restore.
    pub counters: Vec<VcpuCounters>,
    /// CORRUPT port events seen by this VMM process.
    pub corrupt_events: u64,
    /// Pass-done port events seen by this VMM process.
    pub pass_events: u64,
    pub guest_layout: Option<GuestLayout>,
    pub uptime_ms: u64,
}

/// A reply as the handler produces it and the client receives it.
#[derive(Debug)]
pub struct Reply {
    pub response: Response,
    pub attachment: Vec<u8>,
    /// Sent as SCM_RIGHTS with the reply, then closed on the sending side
    /// (so a handler passes a dup, e.g. `fd.try_clone_to_owned()`).
    pub fd: Option<OwnedFd>,
}

impl Reply {
    fn plain(response: Response) -> Self {
        Self {
            response,
            attachment: Vec::new(),
            fd: None,
        }
    }

    pub fn ok() -> Self {
        Self::plain(Response::Ok)
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::plain(Response::Error {
            code,
            message: message.into(),
        })
    }

    pub fn status(status: VmStatus) -> Self {
        Self::plain(Response::Status(status))
    }

    pub fn bitmap(bitmap: &DirtyBitmap) -> Self {
        Self {
            response: Response::Bitmap {
                pages: bitmap.pages(),
            },
            attachment: bitmap.to_bytes(),
            fd: None,
        }
    }

    /// `blob` is `VmState::to_bytes()`.
    pub fn state(blob: Vec<u8>) -> Self {
        Self {
            response: Response::State,
            attachment: blob,
            fd: None,
        }
    }

    pub fn memory(layout: MemoryLayout, memfd: OwnedFd) -> Self {
        Self {
            response: Response::Memory { layout },
            attachment: Vec::new(),
            fd: Some(memfd),
        }
    }

    pub fn userfaultfd(regions: Vec<PagerRegion>, uffd: OwnedFd) -> Self {
        Self {
            response: Response::Userfaultfd { regions },
            attachment: Vec::new(),
            fd: Some(uffd),
        }
    }
}

/// A frame's fixed header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub json_len: u32,
    pub attachment_len: u32,
}

/// A frame that cannot be accepted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("json part of {len} bytes exceeds the {max} byte cap")]
    JsonTooLarge { len: u64, max: u32 },
    #[error("attachment of {len} bytes exceeds the {max} byte cap")]
    AttachmentTooLarge { len: u64, max: u32 },
    #[error("empty json part")]
    EmptyJson,
}

impl FrameHeader {
    /// Parses and checks the caps, so callers may allocate `body_len()`.
    pub fn decode(bytes: [u8; FRAME_HEADER_LEN]) -> Result<Self, FrameError> {
        let json_len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let attachment_len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let header = Self {
            json_len,
            attachment_len,
        };
        header.check()?;
        Ok(header)
    }

    fn check(&self) -> Result<(), FrameError> {
        if self.json_len == 0 {
            return Err(FrameError::EmptyJson);
        }
        if self.json_len > MAX_JSON_LEN {
            return Err(FrameError::JsonTooLarge {
                len: self.json_len.into(),
                max: MAX_JSON_LEN,
            });
        }
        if self.attachment_len > MAX_ATTACHMENT_LEN {
            return Err(FrameError::AttachmentTooLarge {
                len: self.attachment_len.into(),
                max: MAX_ATTACHMENT_LEN,
            });
        }
        Ok(())
    }

    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[..4].copy_from_slice(&self.json_len.to_le_bytes());
        out[4..].copy_from_slice(&self.attachment_len.to_le_bytes());
        out
    }

    /// Bytes after the header.
    pub fn body_len(&self) -> usize {
        self.json_len as usize + self.attachment_len as usize
    }
}

/// A whole frame, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub json: Vec<u8>,
    pub attachment: Vec<u8>,
}

/// Builds a frame, refusing parts over the caps.
pub fn encode_frame(json: &[u8], attachment: &[u8]) -> Result<Vec<u8>, FrameError> {
    let json_len = u32::try_from(json.len()).map_err(|_| FrameError::JsonTooLarge {
        len: json.len() as u64,
        max: MAX_JSON_LEN,
    })?;
    let attachment_len =
        u32::try_from(attachment.len()).map_err(|_| FrameError::AttachmentTooLarge {
            len: attachment.len() as u64,
            max: MAX_ATTACHMENT_LEN,
        })?;
    let header = FrameHeader {
        json_len,
        attachment_len,
    };
    header.check()?;
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + header.body_len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(json);
    out.extend_from_slice(attachment);
    Ok(out)
}

/// Decodes one frame from the front of `buf`: `Ok(None)` if more bytes are
/// needed, otherwise the frame and how many bytes it used. Never panics.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(head) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(None);
    };
    let header = FrameHeader::decode(*head)?;
    let total = FRAME_HEADER_LEN + header.body_len();
    let Some(body) = buf.get(FRAME_HEADER_LEN..total) else {
        return Ok(None);
    };
    let (json, attachment) = body.split_at(header.json_len as usize);
    Ok(Some((
        Frame {
            json: json.to_vec(),
            attachment: attachment.to_vec(),
        },
        total,
    )))
}

/// Parses a request's JSON part.
pub fn parse_request(json: &[u8]) -> Result<Request, serde_json::Error> {
    serde_json::from_slice(json)
}

#[cfg(test)]
mod tests;
