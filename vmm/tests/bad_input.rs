//! Hostile or broken input never takes the guest down: malformed control
//! requests get error replies while the guest keeps running, and a bad
//! state file stops `restore` before any guest starts.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::*;
use guestmem::{GuestMemory, MemoryLayout};
use vmm::control::RunState;
use vmm::control::{
    encode_frame, read_reply, ErrorCode, FrameHeader, Response, MAX_ATTACHMENT_LEN, MAX_JSON_LEN,
};
use vmm::kvm_check::kvm_available_or_skip;
use vmm::state::{write_blob, HEADER_LEN};

fn raw(vmm: &Vmm) -> UnixStream {
    let s = UnixStream::connect(&vmm.socket).expect("connect");
    s.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
    s
}

fn error_code(r: &vmm::control::Reply) -> Option<ErrorCode> {
    match &r.response {
        Response::Error { code, .. } => Some(*code),
        _ => None,
    }
}

/// True once the peer has closed the connection.
fn closed(mut s: UnixStream) -> bool {
    let mut rest = Vec::new();
    matches!(s.read_to_end(&mut rest), Ok(0))
}

#[test]
fn malformed_requests_get_errors_and_guest_keeps_running() {
    if !kvm_available_or_skip() {
        return;
    }
    let dir = scratch();
    let vmm = Vmm::run(dir.path(), "bad-requests", &RunOpts::default());
    wait_for(&vmm, "first pass", Duration::from_secs(60), |s| {
        all_passes_at_least(s, 1)
    });

    // Garbage JSON: error reply, connection still usable.
    let mut s = raw(&vmm);
    s.write_all(&encode_frame(b"{\"op\":\"status\"", &[]).unwrap())
        .unwrap();
    assert_eq!(
        error_code(&read_reply(&s).unwrap()),
        Some(ErrorCode::BadRequest)
    );
    s.write_all(&encode_frame(b"\x00\xff\xfe binary", &[]).unwrap())
        .unwrap();
    assert_eq!(
        error_code(&read_reply(&s).unwrap()),
        Some(ErrorCode::BadRequest)
    );
    s.write_all(&encode_frame(br#"{"op":"launch_missiles"}"#, &[]).unwrap())
        .unwrap();
    assert_eq!(
        error_code(&read_reply(&s).unwrap()),
        Some(ErrorCode::BadRequest)
    );
    s.write_all(&encode_frame(br#"{"op":"status"}"#, &[]).unwrap())
        .unwrap();
    assert!(matches!(
        read_reply(&s).unwrap().response,
        Response::Status(_)
    ));

    // Oversized lengths: error reply, then the connection is closed.
    for (json_len, attachment_len) in [
        (MAX_JSON_LEN + 1, 0),
        (16, MAX_ATTACHMENT_LEN + 1),
        (u32::MAX, u32::MAX),
    ] {
        let mut s = raw(&vmm);
        s.write_all(
            &FrameHeader {
                json_len,
                attachment_len,
            }
            .encode(),
        )
        .unwrap();
        assert_eq!(
            error_code(&read_reply(&s).unwrap()),
            Some(ErrorCode::TooLarge)
        );
        assert!(closed(s));
    }

    // Truncated: the peer still reading gets an error; a vanished peer
    // just loses its connection.
    let frame = encode_frame(br#"{"op":"pause"}"#, &[]).unwrap();
    let mut s = raw(&vmm);
    s.write_all(&frame[..frame.len() - 4]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        error_code(&read_reply(&s).unwrap()),
        Some(ErrorCode::Truncated)
    );
    let mut s = raw(&vmm);
    s.write_all(&frame[..5]).unwrap();
    drop(s);

    // Pure noise.
    let mut s = raw(&vmm);
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = s.write_all(&noise);
    let _ = s.shutdown(Shutdown::Write);
    // Whatever the noise framed as, the VMM answers with an error or closes.
    if let Ok(r) = read_reply(&s) {
        assert!(error_code(&r).is_some(), "{:?}", r.response);
    }

    // None of that paused the guest (the truncated request was a Pause
    // that must not have run) and it still makes progress.
    let s = vmm.status();
    assert_eq!(s.run_state, RunState::Running);
    let p = s.counters[0].passes;
    wait_for(
        &vmm,
        "progress after bad input",
        Duration::from_secs(60),
        |s| s.counters[0].passes > p,
    );
    assert_eq!(total_corrupt(&vmm.status()), 0);
    assert!(vmm.shutdown().success());
}

/// Expects `restore --state path` to fail cleanly; returns its stderr.
fn restore_must_fail(dir: &Path, name: &str, memfd: &std::os::fd::OwnedFd, path: &Path) -> String {
    match Vmm::restore(dir, name, memfd, Some(path)) {
        Started::Ready(_) => panic!("{name}: restore from a bad state file printed READY"),
        Started::Failed {
            status,
            stdout,
            stderr,
        } => {
            assert!(!status.success(), "{name}: exit status {status}");
            assert!(!stdout.contains("READY"), "{name}: stdout {stdout}");
            assert!(
                !dir.join(format!("{name}.sock")).exists(),
                "{name}: control socket left behind"
            );
            stderr
        }
    }
}

#[test]
fn restore_from_bad_state_file_fails_cleanly() {
    if !kvm_available_or_skip() {
        return;
    }
    let dir = scratch();
    let src = Vmm::run(dir.path(), "state-src", &RunOpts::default());
    wait_for(&src, "first pass", Duration::from_secs(60), |s| {
        all_passes_at_least(s, 1)
    });
    let mut c = src.client();
    // SaveState while running is refused.
    assert_eq!(
        c.save_state().unwrap_err().code(),
        Some(ErrorCode::WrongState)
    );
    c.pause().unwrap();
    let blob = c.save_state().expect("save state");
    let (_layout, memfd) = c.get_memory().unwrap();

    let mut corrupted = blob.clone();
    let mid = HEADER_LEN + (blob.len() - HEADER_LEN) / 2;
    corrupted[mid] ^= 0x10;
    let truncated = &blob[..blob.len() - 100];
    let mut wrong_version = blob.clone();
    wrong_version[8..12].copy_from_slice(&999u32.to_le_bytes());

    let cases: [(&str, &[u8], &str); 4] = [
        ("corrupted", &corrupted, "checksum"),
        ("truncated", truncated, "truncated"),
        ("wrong-version", &wrong_version, "version 999"),
        ("not-a-state", b"hello, world", "magic"),
    ];
    for (name, bytes, needle) in cases {
        let path = dir.path().join(format!("{name}.state"));
        write_blob(&path, bytes).unwrap();
        let stderr = restore_must_fail(dir.path(), name, &memfd, &path);
        assert!(
            stderr.to_lowercase().contains(needle),
            "{name}: stderr does not say {needle:?}:\n{stderr}"
        );
    }
    let missing = restore_must_fail(dir.path(), "missing", &memfd, &dir.path().join("nope"));
    assert!(missing.contains("nope"), "{missing}");

    // A memfd whose size does not match the saved layout is refused too.
    let good = dir.path().join("good.state");
    write_blob(&good, &blob).unwrap();
    let small = GuestMemory::create("small", MemoryLayout::for_size(32 << 20).unwrap()).unwrap();
    let small_fd = small.fd().try_clone_to_owned().unwrap();
    let stderr = restore_must_fail(dir.path(), "wrong-size", &small_fd, &good);
    assert!(stderr.contains("memfd"), "{stderr}");

    // --wait-state: a bad blob in a Restore request is refused with a code
    // and the VMM keeps waiting; a good one then restores.
    let waiting = match Vmm::restore(dir.path(), "waiting", &memfd, None) {
        Started::Ready(v) => v,
        Started::Failed { stderr, .. } => panic!("--wait-state did not start:\n{stderr}"),
    };
    let mut w = waiting.client();
    for bad in [&corrupted[..], truncated, &wrong_version[..], b"junk"] {
        let err = w.restore(bad).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadState), "{err}");
        assert_eq!(w.status().unwrap().run_state, RunState::WaitingForState);
    }
    assert_eq!(w.pause().unwrap_err().code(), Some(ErrorCode::WrongState));
    w.restore(&blob).expect("good blob restores");
    assert_eq!(w.status().unwrap().run_state, RunState::Paused);
    assert_eq!(
        w.restore(&blob).unwrap_err().code(),
        Some(ErrorCode::WrongState),
        "a second restore is refused"
    );
    assert!(waiting.shutdown().success());

    // The guest's memory was never disturbed: the good blob still restores
    // and runs.
    assert!(src.shutdown().success());
    match Vmm::restore(dir.path(), "good", &memfd, Some(&good)) {
        Started::Ready(v) => {
            v.client().resume().unwrap();
            let p = v.status().counters[0].passes;
            wait_for(&v, "progress", Duration::from_secs(60), |s| {
                s.counters[0].passes > p
            });
            assert!(v.shutdown().success());
        }
        Started::Failed { stderr, .. } => panic!("good state did not restore:\n{stderr}"),
    }
}
