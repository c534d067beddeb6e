//! Fuzzes `transport::codec::decode`: any input is a frame, incomplete or
//! an error, never a panic; a decoded frame re-encodes to a frame that
//! decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transport::codec::{decode, FrameBuffer};

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Ok(Some((frame, used))) => {
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
    // The same bytes fed one at a time must give the same first result.
    let mut fb = FrameBuffer::new();
    for b in data.iter().take(4096) {
        fb.push(std::slice::from_ref(b));
        match fb.next_frame() {
            Ok(None) => continue,
            _ => break,
        }
    }
});
