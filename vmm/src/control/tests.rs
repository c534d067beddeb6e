//! Framing tests and an in-process server/client test with a fake handler.

use super::*;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use guestmem::GuestMemory;
use proptest::prelude::*;

#[test]
fn frame_round_trip_and_incomplete_prefixes() {
    let frame = encode_frame(br#"{"op":"status"}"#, b"attach").unwrap();
    for cut in 0..frame.len() {
        assert_eq!(decode_frame(&frame[..cut]), Ok(None), "cut at {cut}");
    }
    let mut two = frame.clone();
    two.extend_from_slice(&frame);
    let (f, used) = decode_frame(&two).unwrap().unwrap();
    assert_eq!(used, frame.len());
    assert_eq!(f.json, br#"{"op":"status"}"#);
    assert_eq!(f.attachment, b"attach");
}

#[test]
fn oversized_lengths_are_refused_before_allocating() {
    let mut head = FrameHeader {
        json_len: MAX_JSON_LEN + 1,
        attachment_len: 0,
    }
    .encode();
    assert_eq!(
        decode_frame(&head),
        Err(FrameError::JsonTooLarge {
            len: u64::from(MAX_JSON_LEN) + 1,
            max: MAX_JSON_LEN
        })
    );
    head = FrameHeader {
        json_len: 2,
        attachment_len: u32::MAX,
    }
    .encode();
    assert!(matches!(
        decode_frame(&head),
        Err(FrameError::AttachmentTooLarge { .. })
    ));
    assert_eq!(decode_frame(&[0u8; 8]), Err(FrameError::EmptyJson));
    let big = vec![b' '; MAX_JSON_LEN as usize + 1];
    assert!(encode_frame(&big, &[]).is_err());
}

#[test]
fn requests_and_responses_round_trip_through_json() {
    let reqs = [
        Request::Status,
        Request::Pause,
        Request::Resume,
        Request::Throttle { pct: 80 },
        Request::DirtyLogStart,
        Request::DirtyLogFetch,
        Request::DirtyLogStop,
        Request::SaveState,
        Request::GetMemory,
        Request::Restore,
        Request::Userfaultfd,
        Request::UserfaultfdRelease,
        Request::Shutdown,
    ];
    for r in reqs {
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r.name()), "{json}");
        assert_eq!(parse_request(json.as_bytes()).unwrap(), r);
    }
    assert_eq!(
        parse_request(br#"{"op":"throttle","pct":80}"#).unwrap(),
        Request::Throttle { pct: 80 }
    );
    // Out-of-range for u8 is a parse error, not a wrap.
    assert!(parse_request(br#"{"op":"throttle","pct":300}"#).is_err());
    assert!(parse_request(br#"{"op":"explode"}"#).is_err());
    let resp = Response::Error {
        code: ErrorCode::WrongState,
        message: "running".into(),
    };
    let json = serde_json::to_string(&resp).unwrap();
    assert_eq!(
        json,
        r#"{"reply":"error","code":"wrong_state","message":"running"}"#
    );
    // A code from a newer VMM still decodes.
    let newer: Response =
        serde_json::from_str(r#"{"reply":"error","code":"brand_new","message":"x"}"#).unwrap();
    assert!(matches!(
        newer,
        Response::Error {
            code: ErrorCode::Unknown,
            ..
        }
    ));
    let uffd = Response::Userfaultfd {
        regions: vec![guestmem::PagerRegion {
            first_index: 0,
            pages: 512,
            host_addr: 0x7f00_0000_0000,
        }],
    };
    let json = serde_json::to_string(&uffd).unwrap();
    assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), uffd);
    let st = Response::Status(sample_status());
    let back: Response = serde_json::from_slice(&serde_json::to_vec(&st).unwrap()).unwrap();
    assert_eq!(back, st);
}

proptest! {
    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(Some((frame, used))) = decode_frame(&bytes) {
            prop_assert!(used <= bytes.len());
            let _ = parse_request(&frame.json);
            let _ = serde_json::from_slice::<Response>(&frame.json);
        }
        let _ = parse_request(&bytes);
    }

    #[test]
    fn encode_decode_round_trip(json in proptest::collection::vec(any::<u8>(), 1..300),
                                att in proptest::collection::vec(any::<u8>(), 0..300)) {
        let frame = encode_frame(&json, &att).unwrap();
        let (f, used) = decode_frame(&frame).unwrap().unwrap();
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(f.json, json);
        prop_assert_eq!(f.attachment, att);
    }
}

fn sample_status() -> VmStatus {
    VmStatus {
        name: "fake".into(),
        run_state: RunState::Crashed {
            reason: "test".into(),
        },
        vcpus: 2,
        memory_bytes: 2 << 20,
        throttle_pct: 0,
        dirty_logging: false,
        counters: vec![Default::default(), Default::default()],
        corrupt_events: 0,
        pass_events: 7,
        guest_layout: None,
        uptime_ms: 5,
    }
}

/// A handler that records what it got and serves a real memfd.
struct Fake {
    mem: GuestMemory,
    seen: Mutex<Vec<(Request, usize)>>,
    sent: Mutex<Vec<Request>>,
}

impl ControlHandler for Fake {
    fn handle(&self, req: Request, attachment: Vec<u8>) -> Reply {
        self.seen
            .lock()
            .unwrap()
            .push((req.clone(), attachment.len()));
        match req {
            Request::Status => Reply::status(sample_status()),
            Request::GetMemory => Reply::memory(
                self.mem.layout().clone(),
                self.mem.fd().try_clone_to_owned().unwrap(),
            ),
            Request::DirtyLogFetch => {
                let mut b = DirtyBitmap::new(self.mem.layout().total_pages());
                b.set(3);
                b.set(511);
                Reply::bitmap(&b)
            }
            Request::SaveState => Reply::state(b"not really a blob".to_vec()),
            Request::Restore => match VmState::from_bytes(&attachment) {
                Ok(_) => Reply::ok(),
                Err(e) => Reply::error(ErrorCode::BadState, e.to_string()),
            },
            Request::Pause => Reply::error(ErrorCode::WrongState, "already paused"),
            _ => Reply::ok(),
        }
    }

    fn reply_sent(&self, req: &Request) {
        self.sent.lock().unwrap().push(req.clone());
    }
}

fn start_fake() -> (tempfile::TempDir, std::path::PathBuf, Arc<Fake>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let layout = guestmem::MemoryLayout::for_size(2 << 20).unwrap();
    let fake = Arc::new(Fake {
        mem: GuestMemory::create("control-test", layout).unwrap(),
        seen: Mutex::new(Vec::new()),
        sent: Mutex::new(Vec::new()),
    });
    let _accept = serve(listener, fake.clone());
    (dir, path, fake)
}

#[test]
fn client_and_server_exchange_every_kind_of_reply() {
    let (_dir, path, fake) = start_fake();
    let mut c =
        ControlClient::connect_with_timeout(&path, std::time::Duration::from_secs(10)).unwrap();

    assert_eq!(c.status().unwrap(), sample_status());
    c.resume().unwrap();
    c.throttle(80).unwrap();
    let err = c.pause().unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::WrongState), "{err}");

    let bitmap = c.dirty_log_fetch().unwrap();
    assert_eq!(bitmap.iter().collect::<Vec<_>>(), vec![3, 511]);
    assert_eq!(c.save_state().unwrap(), b"not really a blob");

    let err = c.restore(b"garbage").unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadState), "{err}");

    // Protocol-level checks happen before the handler.
    let err = c.throttle(100).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    let reply = c.call(&Request::Status, b"x").unwrap();
    assert!(matches!(
        reply.response,
        Response::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    c.shutdown().unwrap();
    // One connection is served in order, so once the next reply is here
    // the server has run reply_sent for the shutdown.
    c.status().unwrap();

    let seen = fake.seen.lock().unwrap().clone();
    assert!(!seen
        .iter()
        .any(|(r, _)| *r == Request::Throttle { pct: 100 }));
    assert!(seen.contains(&(Request::Restore, 7)));
    let sent = fake.sent.lock().unwrap().clone();
    // reply_sent for the final Status may still be running (it comes after
    // the client has its reply); the Shutdown's has run for sure.
    let tail: Vec<_> = sent
        .iter()
        .rev()
        .skip_while(|r| **r == Request::Status)
        .take(1)
        .collect();
    assert_eq!(tail, [&Request::Shutdown], "sent: {sent:?}");
}

#[test]
fn memfd_is_passed_and_shares_guest_memory() {
    let (_dir, path, fake) = start_fake();
    let mut c = ControlClient::connect(&path).unwrap();
    fake.mem.write_at(4096 * 5 + 17, b"from the vmm").unwrap();

    let (layout, fd) = c.get_memory().unwrap();
    assert_eq!(&layout, fake.mem.layout());
    assert_ne!(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        std::os::fd::AsRawFd::as_raw_fd(&fake.mem.fd())
    );
    let ours = GuestMemory::from_fd(fd, layout).unwrap();
    let mut buf = [0u8; 12];
    ours.read_at(4096 * 5 + 17, &mut buf).unwrap();
    assert_eq!(&buf, b"from the vmm");
    // MAP_SHARED on the same memfd: writes are visible both ways.
    ours.write_at(100, b"from the client").unwrap();
    let mut back = [0u8; 15];
    fake.mem.read_at(100, &mut back).unwrap();
    assert_eq!(&back, b"from the client");
    // The fd arrived close-on-exec.
    let flags = nix::fcntl::fcntl(ours.fd().as_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert_ne!(flags & libc::FD_CLOEXEC, 0);
    // And the connection is still in sync afterwards.
    assert_eq!(c.status().unwrap().name, "fake");
}

fn raw(path: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s
}

fn error_code(reply: &Reply) -> Option<ErrorCode> {
    match &reply.response {
        Response::Error { code, .. } => Some(*code),
        _ => None,
    }
}

#[test]
fn garbage_json_gets_bad_request_and_connection_survives() {
    let (_dir, path, _fake) = start_fake();
    let mut s = raw(&path);
    s.write_all(&encode_frame(b"\xff\x00not json", &[]).unwrap())
        .unwrap();
    let reply = read_reply(&s).unwrap();
    assert_eq!(error_code(&reply), Some(ErrorCode::BadRequest));
    write_request(&s, &Request::Status, &[]).unwrap();
    assert!(matches!(
        read_reply(&s).unwrap().response,
        Response::Status(_)
    ));
    // Byte garbage that happens to frame as an empty json part.
    s.write_all(&[0u8; 8]).unwrap();
    let reply = read_reply(&s).unwrap();
    assert_eq!(error_code(&reply), Some(ErrorCode::BadRequest));
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "connection closed");
}

#[test]
fn oversized_request_gets_error_and_close() {
    let (_dir, path, fake) = start_fake();
    let mut s = raw(&path);
    let head = FrameHeader {
        json_len: 16,
        attachment_len: MAX_ATTACHMENT_LEN + 1,
    }
    .encode();
    s.write_all(&head).unwrap();
    let reply = read_reply(&s).unwrap();
    assert_eq!(error_code(&reply), Some(ErrorCode::TooLarge));
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    assert!(fake.seen.lock().unwrap().is_empty());
    // The server still accepts new connections.
    assert_eq!(
        ControlClient::connect(&path)
            .unwrap()
            .status()
            .unwrap()
            .vcpus,
        2
    );
}

#[test]
fn truncated_request_gets_error_when_peer_still_reads() {
    let (_dir, path, fake) = start_fake();
    let mut s = raw(&path);
    let frame = encode_frame(br#"{"op":"status"}"#, &[]).unwrap();
    s.write_all(&frame[..frame.len() - 3]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let reply = read_reply(&s).unwrap();
    assert_eq!(error_code(&reply), Some(ErrorCode::Truncated));
    assert!(fake.seen.lock().unwrap().is_empty());
    // A half header followed by a full close just ends the connection.
    let mut s = raw(&path);
    s.write_all(&frame[..3]).unwrap();
    drop(s);
    assert_eq!(
        ControlClient::connect(&path)
            .unwrap()
            .status()
            .unwrap()
            .vcpus,
        2
    );
}
