//! The blocking client side of the control socket, used by the daemon,
//! tests and the benchmark.

use std::io::{self, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use guestmem::{
    BitmapError, DirtyBitmap, GuestMemory, GuestMemoryError, MemoryLayout, PagerRegion,
};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use super::{
    encode_frame, ErrorCode, FrameError, FrameHeader, Reply, Request, Response, VmStatus,
    FRAME_HEADER_LEN,
};

/// A control request that did not get the expected answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot connect to control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket i/o failed")]
    Io(#[source] io::Error),
    #[error("vmm closed the control connection")]
    Closed,
    #[error("vmm sent a bad frame")]
    Frame(#[source] FrameError),
    #[error("request cannot be framed")]
    Request(#[source] FrameError),
    #[error("vmm reply is not valid json")]
    Json(#[source] serde_json::Error),
    #[error("vmm refused {request}: {code}: {message}")]
    Remote {
        request: &'static str,
        code: ErrorCode,
        message: String,
    },
    #[error("unexpected reply to {request}: {got}")]
    Unexpected {
        request: &'static str,
        got: &'static str,
    },
    #[error("{request} reply carried no file descriptor")]
    MissingFd { request: &'static str },
    #[error("dirty bitmap attachment is invalid")]
    Bitmap(#[source] BitmapError),
    #[error("cannot map guest memory from the vmm's memfd")]
    Map(#[source] GuestMemoryError),
}

impl CallError {
    /// The VMM's error code, if the VMM refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            CallError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn response_name(r: &Response) -> &'static str {
    match r {
        Response::Ok => "ok",
        Response::Status(_) => "status",
        Response::Bitmap { .. } => "bitmap",
        Response::State => "state",
        Response::Memory { .. } => "memory",
        Response::Userfaultfd { .. } => "userfaultfd",
        Response::Error { .. } => "error",
    }
}

/// Receives exactly `buf.len()` bytes, keeping any fds passed alongside.
/// Received fds are close-on-exec.
fn recv_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<(), CallError> {
    let mut done = 0;
    while done < buf.len() {
        let mut cmsg_buf = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut buf[done..])];
        let msg = match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(CallError::Io(io::Error::from(e))),
        };
        let n = msg.bytes;
        if let Ok(cmsgs) = msg.cmsgs() {
            for cmsg in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = cmsg {
                    for fd in raw {
                        // SAFETY: the kernel just installed `fd` in our fd
                        // table for this message; nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        if n == 0 {
            return Err(CallError::Closed);
        }
        done += n;
    }
    Ok(())
}

/// Reads one reply frame from `stream` (fds included). Public for tests
/// that write raw, possibly malformed, requests.
pub fn read_reply(stream: &UnixStream) -> Result<Reply, CallError> {
    let mut fds = Vec::new();
    let mut head = [0u8; FRAME_HEADER_LEN];
    recv_exact(stream, &mut head, &mut fds)?;
    let header = FrameHeader::decode(head).map_err(CallError::Frame)?;
    // Capped by decode.
    let mut json = vec![0u8; header.json_len as usize];
    recv_exact(stream, &mut json, &mut fds)?;
    let mut attachment = vec![0u8; header.attachment_len as usize];
    recv_exact(stream, &mut attachment, &mut fds)?;
    let response: Response = serde_json::from_slice(&json).map_err(CallError::Json)?;
    // At most one fd is meaningful; extra ones are closed on drop.
    let fd = if fds.is_empty() {
        None
    } else {
        Some(fds.swap_remove(0))
    };
    Ok(Reply {
        response,
        attachment,
        fd,
    })
}

/// Frames and writes one request.
pub fn write_request(
    mut stream: &UnixStream,
    req: &Request,
    attachment: &[u8],
) -> Result<(), CallError> {
    let json = serde_json::to_vec(req).map_err(CallError::Json)?;
    let frame = encode_frame(&json, attachment).map_err(CallError::Request)?;
    stream.write_all(&frame).map_err(CallError::Io)
}

/// A blocking connection to one VMM's control socket.
#[derive(Debug)]
pub struct ControlClient {
    stream: UnixStream,
}

impl ControlClient {
    /// Connects with no bound on a call; see
    /// [`connect_with_timeout`](Self::connect_with_timeout).
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, CallError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| CallError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self { stream })
    }

    /// Connects and bounds every read and write of a call to `timeout`
    /// (usually [`VMM_CALL_TIMEOUT`](super::VMM_CALL_TIMEOUT)), so a wedged
    /// VMM fails the call instead of blocking its caller for good.
    pub fn connect_with_timeout(
        path: impl AsRef<Path>,
        timeout: Duration,
    ) -> Result<Self, CallError> {
        let client = Self::connect(path)?;
        client.set_timeout(Some(timeout))?;
        Ok(client)
    }

    /// Wraps an already connected stream.
    pub fn from_stream(stream: UnixStream) -> Self {
        Self { stream }
    }

    /// Bounds how long one read or write may block (`None` = forever). A
    /// timed-out call leaves the connection unusable; reconnect.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), CallError> {
        self.stream
            .set_read_timeout(timeout)
            .and_then(|()| self.stream.set_write_timeout(timeout))
            .map_err(CallError::Io)
    }

    /// Sends any request and returns the raw reply, error replies included.
    pub fn call(&mut self, req: &Request, attachment: &[u8]) -> Result<Reply, CallError> {
        write_request(&self.stream, req, attachment)?;
        read_reply(&self.stream)
    }

    /// Like `call`, but an error reply becomes `CallError::Remote`.
    fn call_ok(&mut self, req: &Request, attachment: &[u8]) -> Result<Reply, CallError> {
        let reply = self.call(req, attachment)?;
        if let Response::Error { code, message } = reply.response {
            return Err(CallError::Remote {
                request: req.name(),
                code,
                message,
            });
        }
        Ok(reply)
    }

    fn expect_ok(&mut self, req: Request) -> Result<(), CallError> {
        let reply = self.call_ok(&req, &[])?;
        match reply.response {
            Response::Ok => Ok(()),
            other => Err(CallError::Unexpected {
                request: req.name(),
                got: response_name(&other),
            }),
        }
    }

    pub fn status(&mut self) -> Result<VmStatus, CallError> {
        let reply = self.call_ok(&Request::Status, &[])?;
        match reply.response {
            Response::Status(s) => Ok(s),
            other => Err(CallError::Unexpected {
                request: "status",
                got: response_name(&other),
            }),
        }
    }

    pub fn pause(&mut self) -> Result<(), CallError> {
        self.expect_ok(Request::Pause)
    }

    pub fn resume(&mut self) -> Result<(), CallError> {
        self.expect_ok(Request::Resume)
    }

    /// `pct` in 0..=99; 0 turns throttling off.
    pub fn throttle(&mut self, pct: u8) -> Result<(), CallError> {
        self.expect_ok(Request::Throttle { pct })
    }

    pub fn dirty_log_start(&mut self) -> Result<(), CallError> {
        self.expect_ok(Request::DirtyLogStart)
    }

    /// Pages dirtied since the previous fetch (fetch-and-clear).
    pub fn dirty_log_fetch(&mut self) -> Result<DirtyBitmap, CallError> {
        let reply = self.call_ok(&Request::DirtyLogFetch, &[])?;
        match reply.response {
            Response::Bitmap { pages } => {
                DirtyBitmap::from_bytes(pages, &reply.attachment).map_err(CallError::Bitmap)
            }
            other => Err(CallError::Unexpected {
                request: "dirty_log_fetch",
                got: response_name(&other),
            }),
        }
    }

    pub fn dirty_log_stop(&mut self) -> Result<(), CallError> {
        self.expect_ok(Request::DirtyLogStop)
    }

    /// The state blob (`VmState::to_bytes` form), only while paused.
    pub fn save_state(&mut self) -> Result<Vec<u8>, CallError> {
        let reply = self.call_ok(&Request::SaveState, &[])?;
        match reply.response {
            Response::State => Ok(reply.attachment),
            other => Err(CallError::Unexpected {
                request: "save_state",
                got: response_name(&other),
            }),
        }
    }

    /// The guest memfd (close-on-exec) and its layout.
    pub fn get_memory(&mut self) -> Result<(MemoryLayout, OwnedFd), CallError> {
        let reply = self.call_ok(&Request::GetMemory, &[])?;
        match reply.response {
            Response::Memory { layout } => {
                let fd = reply.fd.ok_or(CallError::MissingFd {
                    request: "get_memory",
                })?;
                Ok((layout, fd))
            }
            other => Err(CallError::Unexpected {
                request: "get_memory",
                got: response_name(&other),
            }),
        }
    }

    /// `get_memory`, mapped.
    pub fn map_memory(&mut self) -> Result<GuestMemory, CallError> {
        let (layout, fd) = self.get_memory()?;
        GuestMemory::from_fd(fd, layout).map_err(CallError::Map)
    }

    /// Sends a state blob to a VMM started with `restore --wait-state`.
    pub fn restore(&mut self, blob: &[u8]) -> Result<(), CallError> {
        let reply = self.call_ok(&Request::Restore, blob)?;
        match reply.response {
            Response::Ok => Ok(()),
            other => Err(CallError::Unexpected {
                request: "restore",
                got: response_name(&other),
            }),
        }
    }

    /// Post-copy: the VMM's userfaultfd for guest RAM (close-on-exec) and
    /// where each region lives in the VMM, for [`guestmem::Pager::new`].
    /// The first call registers the memory; it must come before `restore`.
    pub fn userfaultfd(&mut self) -> Result<(OwnedFd, Vec<PagerRegion>), CallError> {
        let reply = self.call_ok(&Request::Userfaultfd, &[])?;
        match reply.response {
            Response::Userfaultfd { regions } => {
                let fd = reply.fd.ok_or(CallError::MissingFd {
                    request: "userfaultfd",
                })?;
                Ok((fd, regions))
            }
            other => Err(CallError::Unexpected {
                request: "userfaultfd",
                got: response_name(&other),
            }),
        }
    }

    /// Post-copy is complete: the VMM drops its copy of the userfaultfd.
    pub fn userfaultfd_release(&mut self) -> Result<(), CallError> {
        self.expect_ok(Request::UserfaultfdRelease)
    }

    pub fn shutdown(&mut self) -> Result<(), CallError> {
        self.expect_ok(Request::Shutdown)
    }
}
