//! Fuzzes `transport::codec::decode`: any input is a frame, incomplete or
//! an error, never a panic; a decoded frame re-encodes to a frame that
//! decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transport::codec::{decode, FrameBuffer};

fuzz_target!(|data: &[u8]| {
    let whole = decode(data);
    match &whole {
        Ok(Some((frame, used))) => {
            let (frame, used) = (frame.clone(), *used);
            assert!(used <= data.len());
            let again = frame.to_bytes().expect("a decoded frame re-encodes");
            let (back, n) = decode(&again)
                .expect("re-encoded frame decodes")
                .expect("re-encoded frame is complete");
            assert_eq!(n, again.len());
            assert_eq!(back, frame);
        }
        Ok(None) => {}
        Err(e) => {
            let _ = e.reason();
        }
    }
    // The same bytes fed one at a time must not panic.
    let mut fb = FrameBuffer::new();
    for b in data.iter().take(4096) {
        fb.push(std::slice::from_ref(b));
        match fb.next_frame() {
            Ok(None) => continue,
            _ => break,
        }
    }
    // Fed in chunks (as QUIC delivers them; a page batch spanning chunks is
    // kept as views of them), a frame that decodes whole decodes the same.
    let chunk = data.first().map_or(1, |&b| 1 + usize::from(b) * 29);
    let mut fb = FrameBuffer::new();
    let mut first = Ok(None);
    for piece in data.chunks(chunk) {
        fb.push_chunk(bytes::Bytes::copy_from_slice(piece));
        first = fb.next_frame();
        if !matches!(first, Ok(None)) {
            break;
        }
    }
    if let Ok(Some((frame, _))) = whole {
        match first {
            Ok(Some(got)) => assert_eq!(got, frame),
            other => panic!("whole frame decoded, chunked gave {other:?}"),
        }
    }
});
