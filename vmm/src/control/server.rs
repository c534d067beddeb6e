//! The VMM side of the control socket: an accept loop and one blocking
//! thread per connection, calling a [`ControlHandler`] per request.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use super::{
    encode_frame, parse_request, ErrorCode, FrameError, FrameHeader, Reply, Request, Response,
    FRAME_HEADER_LEN, MAX_JSON_LEN,
};

/// Once a frame has started, the rest of it must arrive within this time;
/// a peer that stalls mid-frame is treated as a truncated request rather
/// than holding a thread forever. Idle time between frames is unlimited.
const FRAME_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the VMM does with requests. Implemented by the VM (V2b) and by
/// fakes in tests.
pub trait ControlHandler: Send + Sync + 'static {
    /// Handles one request. `attachment` is empty except for `Restore`
    /// (the server refuses attachments on other requests). Errors are
    /// replies (`Reply::error`), never panics.
    fn handle(&self, req: Request, attachment: Vec<u8>) -> Reply;

    /// Called after the reply to `req` was written (or failed to be
    /// written). `Shutdown` uses it to exit only once the client has its
    /// `Ok`.
    fn reply_sent(&self, _req: &Request) {}
}

/// Serves `listener` on a background thread, one thread per connection.
/// The returned thread ends only if accepting fails persistently.
pub fn serve(listener: UnixListener, handler: Arc<dyn ControlHandler>) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("control-accept".into())
        .spawn(move || accept_loop(listener, handler))
        .expect("spawn control accept thread")
}

fn accept_loop(listener: UnixListener, handler: Arc<dyn ControlHandler>) {
    let mut consecutive_errors = 0u32;
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                consecutive_errors = 0;
                let handler = Arc::clone(&handler);
                let spawned = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_connection(stream, handler.as_ref()));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot spawn control connection thread");
                }
            }
            Err(e) => {
                // EMFILE and friends are transient; a listener that only
                // ever fails is broken and the loop gives up.
                consecutive_errors += 1;
                tracing::warn!(error = %e, "control socket accept failed");
                if consecutive_errors >= 1000 {
                    tracing::error!("control socket accept keeps failing; no longer serving");
                    return;
                }
            }
        }
    }
}

/// Why a frame could not be read.
enum ReadFrameError {
    /// Clean end of stream between frames.
    Closed,
    /// End of stream or stall inside a frame.
    Truncated,
    /// Lengths over the caps.
    Frame(FrameError),
    Io(io::Error),
}

/// Reads into `buf` completely; `Ok(n < buf.len())` means end of stream.
fn read_full(stream: &mut UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match stream.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn read_request_frame(stream: &mut UnixStream) -> Result<(Vec<u8>, Vec<u8>), ReadFrameError> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    // The first byte may take forever (an idle client); the rest of the
    // frame may not.
    stream.set_read_timeout(None).map_err(ReadFrameError::Io)?;
    match read_full(stream, &mut head[..1]) {
        Ok(0) => return Err(ReadFrameError::Closed),
        Ok(_) => {}
        Err(e) => return Err(ReadFrameError::Io(e)),
    }
    stream
        .set_read_timeout(Some(FRAME_BODY_TIMEOUT))
        .map_err(ReadFrameError::Io)?;
    let complete = |r: io::Result<usize>, want: usize| match r {
        Ok(n) if n == want => Ok(()),
        Ok(_) => Err(ReadFrameError::Truncated),
        Err(e) if is_timeout(&e) => Err(ReadFrameError::Truncated),
        Err(e) => Err(ReadFrameError::Io(e)),
    };
    complete(read_full(stream, &mut head[1..]), FRAME_HEADER_LEN - 1)?;
    let header = FrameHeader::decode(head).map_err(ReadFrameError::Frame)?;
    // Lengths are capped by decode, so these allocations are bounded.
    let mut json = vec![0u8; header.json_len as usize];
    complete(read_full(stream, &mut json), json.len())?;
    let mut attachment = vec![0u8; header.attachment_len as usize];
    complete(read_full(stream, &mut attachment), attachment.len())?;
    stream.set_read_timeout(None).map_err(ReadFrameError::Io)?;
    Ok((json, attachment))
}

/// Serves one connection until the peer closes it or sends something that
/// breaks the framing. Public so a VMM can serve an already connected
/// socket (e.g. one inherited from the daemon).
pub fn serve_connection(mut stream: UnixStream, handler: &dyn ControlHandler) {
    loop {
        let (json, attachment) = match read_request_frame(&mut stream) {
            Ok(frame) => frame,
            Err(ReadFrameError::Closed) => return,
            Err(ReadFrameError::Truncated) => {
                tracing::warn!("control request truncated; closing connection");
                // The peer may have only shut down its write side.
                let _ = write_reply(
                    &mut stream,
                    Reply::error(ErrorCode::Truncated, "stream ended inside a request"),
                );
                return;
            }
            Err(ReadFrameError::Frame(e)) => {
                tracing::warn!(error = %e, "control request refused; closing connection");
                let code = match e {
                    FrameError::EmptyJson => ErrorCode::BadRequest,
                    FrameError::JsonTooLarge { .. } | FrameError::AttachmentTooLarge { .. } => {
                        ErrorCode::TooLarge
                    }
                };
                let _ = write_reply(&mut stream, Reply::error(code, e.to_string()));
                return;
            }
            Err(ReadFrameError::Io(e)) => {
                tracing::debug!(error = %e, "control connection read failed");
                return;
            }
        };
        let (reply, req) = match parse_request(&json) {
            Err(e) => (
                Reply::error(ErrorCode::BadRequest, format!("invalid request: {e}")),
                None,
            ),
            Ok(req) => (dispatch(handler, &req, attachment), Some(req)),
        };
        let written = write_reply(&mut stream, reply);
        if let Some(req) = &req {
            handler.reply_sent(req);
        }
        if let Err(e) = written {
            tracing::debug!(error = %e, "control reply write failed");
            return;
        }
    }
}

/// Checks what the protocol itself forbids before the handler sees it.
fn dispatch(handler: &dyn ControlHandler, req: &Request, attachment: Vec<u8>) -> Reply {
    if !req.takes_attachment() && !attachment.is_empty() {
        return Reply::error(
            ErrorCode::BadRequest,
            format!("{} takes no attachment", req.name()),
        );
    }
    if let Request::Throttle { pct } = req {
        if *pct > 99 {
            return Reply::error(
                ErrorCode::InvalidArgument,
                format!("throttle pct must be 0..=99, got {pct}"),
            );
        }
    }
    tracing::debug!(request = req.name(), "control request");
    handler.handle(req.clone(), attachment)
}

/// Encodes and writes a reply, passing its fd (if any) with the first
/// bytes. A reply that cannot be encoded becomes an `internal` error.
fn write_reply(stream: &mut UnixStream, reply: Reply) -> io::Result<()> {
    let frame = match encode_reply(&reply.response, &reply.attachment) {
        Ok(frame) => frame,
        Err(message) => {
            tracing::error!(%message, "cannot encode control reply");
            let fallback = Response::Error {
                code: ErrorCode::Internal,
                message,
            };
            encode_reply(&fallback, &[]).map_err(io::Error::other)?
        }
    };
    send_with_fd(stream, &frame, reply.fd.as_ref())
}

fn encode_reply(response: &Response, attachment: &[u8]) -> Result<Vec<u8>, String> {
    let json = serde_json::to_vec(response).map_err(|e| format!("reply json: {e}"))?;
    if json.len() > MAX_JSON_LEN as usize {
        return Err(format!(
            "reply json of {} bytes is over the cap",
            json.len()
        ));
    }
    encode_frame(&json, attachment).map_err(|e| e.to_string())
}

fn send_with_fd(stream: &mut UnixStream, bytes: &[u8], fd: Option<&OwnedFd>) -> io::Result<()> {
    let Some(fd) = fd else {
        return stream.write_all(bytes);
    };
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    // The fd rides on the first sendmsg; whatever it did not send goes
    // after it as plain bytes (the receiver collects fds on every read).
    let sent = loop {
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(bytes)],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
    };
    stream.write_all(&bytes[sent..])
}
