//! Sans-IO session state machines for one migration: [`SourceSession`]
//! turns guest pages into frames, [`DestinationSession`] turns frames back
//! into page writes and replies. Neither owns a socket, a task or a clock;
//! a thin async driver moves their frames over quinn streams.
//!
//! ```text
//!  source                                     destination
//!    │ Hello ───────────────────────────────────▶ │ AwaitHello
//!    │ ◀─────────────────────── HelloAck / Refuse │ (accept/refuse)
//!    │ PassBegin{0}                  (control) ─▶ │ Receiving
//!    │ ZeroRun/PageBatch*   (bulk streams 1..N) ─▶ │  writes pages to the sink
//!    │ PassEnd{0, counts}            (control) ─▶ │  pass complete when counts match
//!    │ ◀──────────────────────────── Ack(Pass 0) │
//!    │ ... passes 1..k, each waits for its Ack ...│
//!    │ State{blob}, Switchover        (control) ─▶│ SwitchedOver → caller resumes guest
//!    │ ◀──────────────────────────────────── Done │ Done
//!    │ Abort{code} ◀──────── at any point ───────▶│ Failed
//! ```
//!
//! Streams: hello, pass boundaries, state, switchover, acks, done and abort
//! use the control stream; page frames may be spread over any number of bulk
//! streams and interleave freely, because every page frame names its pass and
//! `PassEnd` carries the page counts, so the destination knows a pass is
//! complete only when all of its frames arrived, whichever stream carried
//! them. The source starts pass n+1 only after `Ack(Pass n)`, so an older
//! copy of a page can never overwrite a newer one. Post-copy `PageRequest`
//! and `PageReply` go on their own high-priority stream.
//!
//! Post-copy (`source/postcopy.rs`, `destination/postcopy.rs`):
//!
//! ```text
//!    │ State, MissingPages*, Switchover{pc} ─────▶ │ SwitchedOver{pc}: missing set
//!    │ ◀──────────────────────────────── Resumed │ guest runs (downtime ends)
//!    │ ◀──────── PageRequest / PageReply ───────▶ │ faults (priority stream)
//!    │ push batches (bulk, near latest fault) ──▶ │ install only missing pages
//!    │ ◀─────────────────────────────────── Done │ nothing missing
//!  connection lost: both keep their session; new connection:
//!    │ Hello{RESUME} ───────────────────────────▶ │ AwaitResume (prepare_resume)
//!    │ ◀──────────── HelloAck{RESUME}, MissingPages* + re-sent requests
//! ```

mod delta;
mod destination;
mod missing;
mod source;

pub use delta::Compression;
pub use destination::{
    DestAction, DestError, DestOptions, DestPostcopyStats, DestState, DestinationSession,
};
pub use missing::PageBitmap;
pub use source::{
    PassStats, PostcopyStats, SourceError, SourceEvent, SourceOptions, SourceSession, SourceState,
};

use crate::layout::{PageIndex, PAGE_SIZE};

/// Where a source session reads guest pages from (the daemon: the guest's
/// memfd mapping; tests: a vector).
pub trait PageSource {
    /// Copies page `index` into `out`. `index` is always inside the layout.
    fn read_page(&self, index: PageIndex, out: &mut [u8; PAGE_SIZE]) -> std::io::Result<()>;
}

/// Where a destination session writes received pages. Writes happen only
/// after the whole frame was validated, so a rejected frame writes nothing.
pub trait PageSink {
    fn write_page(&mut self, index: PageIndex, data: &[u8; PAGE_SIZE]) -> std::io::Result<()>;

    /// Makes `count` pages from `start` read as zero (a page that was sent
    /// before may have held data).
    fn write_zero(&mut self, start: PageIndex, count: u64) -> std::io::Result<()>;

    /// Copies what page `index` holds now into `out`: the base an
    /// `XorPageBatch` delta is applied to (only asked for pages written with
    /// data before). The default says unsupported; a destination whose sink
    /// keeps it must not agree on [`Capabilities::XOR_DELTA`]
    /// (`DestOptions::capabilities`), or every delta fails the migration.
    ///
    /// [`Capabilities::XOR_DELTA`]: crate::codec::Capabilities::XOR_DELTA
    fn read_back(&self, index: PageIndex, out: &mut [u8; PAGE_SIZE]) -> std::io::Result<()> {
        let _ = (index, out);
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }

    /// Writes consecutive pages; `data` is a whole number of pages. Override
    /// to copy a run with one `memcpy`.
    fn write_pages(&mut self, first: PageIndex, data: &[u8]) -> std::io::Result<()> {
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let page: &[u8; PAGE_SIZE] = page
                .try_into()
                .map_err(|_| std::io::Error::other("partial page"))?;
            self.write_page(PageIndex(first.0 + i as u64), page)?;
        }
        Ok(())
    }

    /// Whether [`PageSink::write_bytes`] works. A sink that can take any
    /// byte range (a plain memory mapping) says yes, and a batch that
    /// arrived in pieces cut inside pages (stream chunks of one datagram
    /// each) is then written piece by piece, straight from the receive
    /// buffers; otherwise every cut page is first gathered into a whole
    /// page. A sink that installs whole pages (post-copy's
    /// `UFFDIO_COPY`) keeps the default, no.
    fn writes_bytes(&self) -> bool {
        false
    }

    /// Writes `data` at byte `at` of the memory, counted as page index x
    /// [`PAGE_SIZE`] + offset in the page: a piece of a checked batch, which
    /// may start and end inside pages. The pieces of one batch together
    /// cover its pages exactly. Called only when
    /// [`PageSink::writes_bytes`] says yes; the default says unsupported.
    fn write_bytes(&mut self, at: u64, data: &[u8]) -> std::io::Result<()> {
        let _ = (at, data);
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}
