//! Wire codec of the page-transfer protocol: frames, their byte layout, and
//! a decoder that never panics on peer bytes.
//!
//! Every frame is a 12-byte header followed by a body:
//!
//! ```text
//! 0      1       2          4            8            12
//! | type | flags | reserved | body_len   | crc32(body) | body ...
//!   u8     u8=0    u16=0      u32 LE       u32 LE
//! ```
//!
//! Each frame type has its own body cap, checked from the header alone, so a
//! peer can never make us allocate more than the cap of the type it claims.
//! `transport/PROTOCOL.md` gives every body layout; this module is the
//! reference implementation. Page data travels raw or as one zstd frame per
//! batch, and a compressed batch must be strictly smaller than the raw pages,
//! which also bounds decompression to the page count the batch claims.
//! `XorPageBatch` carries dirty pages as one zstd frame of XOR deltas
//! against the receiver's current pages, with a CRC32 per rebuilt page;
//! the same size rule bounds it.

mod decode;
pub(crate) mod encode;
mod framebuf;
mod pagedata;
pub(crate) mod pool;

pub use decode::{decode, peek_header, DecodeError};
pub use encode::{EncodeError, Encoder};
pub use framebuf::FrameBuffer;
pub use pagedata::PageData;
pub(crate) use pagedata::PageRuns;

use bytes::Bytes;

use crate::layout::{MemoryLayout, OutOfRange, PageIndex, PageRange, PAGE_SIZE};

/// Version spoken by this build; a peer with another version is refused.
pub const PROTOCOL_VERSION: u16 = 1;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;

/// Most pages one `PageBatch`, `PageRequest` or `PageReply` may carry
/// (512 KiB of page data: large enough that per-frame costs vanish, small
/// enough that a batch fits comfortably in QUIC stream windows).
pub const MAX_BATCH_PAGES: usize = 128;

/// Largest `State` blob (device + vCPU state) a peer may send.
pub const MAX_STATE_BYTES: usize = 64 << 20;

/// Longest host, migration id and VM name in a hello.
pub const MAX_NAME_LEN: usize = 255;

/// Longest refuse/abort message; longer ones are cut when encoding.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// Body cap of the small control frames (hello, ack, abort, ...).
pub const MAX_CONTROL_BODY: usize = 4096;

/// Fixed part of a page batch body before the page bytes.
pub(crate) const BATCH_FIXED_LEN: usize = 16;

/// Body cap of a (raw or compressed) page batch: fixed part, zstd length,
/// the pages and a full offset list.
pub const MAX_BATCH_BODY: usize = BATCH_FIXED_LEN + 4 + MAX_BATCH_PAGES * (PAGE_SIZE + 4);

/// Most ranges one `MissingPages` frame carries; a larger set is split over
/// several frames (64 KiB bodies, so a chunk never waits long behind itself).
pub const MAX_MISSING_RANGES: usize = 4096;

/// Body cap of `MissingPages`: `last` flag, range count, the ranges.
pub const MAX_MISSING_BODY: usize = 1 + 4 + MAX_MISSING_RANGES * 16;

/// Body cap of an `XorPageBatch`: fixed part, a CRC per page, zstd length,
/// the compressed deltas (smaller than the pages) and a full offset list.
pub const MAX_XOR_BATCH_BODY: usize = BATCH_FIXED_LEN + 4 + MAX_BATCH_PAGES * (PAGE_SIZE + 8);

/// Largest body of any frame type.
pub const MAX_FRAME_BODY: usize = MAX_STATE_BYTES;

/// Frame type codes (the header's first byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    Hello = 1,
    HelloAck = 2,
    Refuse = 3,
    PassBegin = 4,
    PassEnd = 5,
    ZeroRun = 6,
    PageBatch = 7,
    CompressedPageBatch = 8,
    State = 9,
    PageRequest = 10,
    PageReply = 11,
    Switchover = 12,
    Done = 13,
    Ack = 14,
    Abort = 15,
    /// Dirty pages as XOR deltas against the versions sent before.
    XorPageBatch = 16,
    /// Post-copy: the destination runs the guest (pages may be missing).
    Resumed = 17,
    /// Post-copy: a chunk of the set of pages the destination lacks.
    MissingPages = 18,
    /// Post-copy, after `Done`: what the destination measured.
    PostcopyReport = 19,
}

impl FrameType {
    pub fn from_u8(v: u8) -> Option<Self> {
        use FrameType::*;
        Some(match v {
            1 => Hello,
            2 => HelloAck,
            3 => Refuse,
            4 => PassBegin,
            5 => PassEnd,
            6 => ZeroRun,
            7 => PageBatch,
            8 => CompressedPageBatch,
            9 => State,
            10 => PageRequest,
            11 => PageReply,
            12 => Switchover,
            13 => Done,
            14 => Ack,
            15 => Abort,
            16 => XorPageBatch,
            17 => Resumed,
            18 => MissingPages,
            19 => PostcopyReport,
            _ => return None,
        })
    }

    /// Largest body this frame type may have.
    pub fn max_body(self) -> usize {
        match self {
            FrameType::PageBatch | FrameType::CompressedPageBatch => MAX_BATCH_BODY,
            FrameType::PageReply => 20 + MAX_BATCH_PAGES * PAGE_SIZE,
            FrameType::XorPageBatch => MAX_XOR_BATCH_BODY,
            FrameType::State => MAX_STATE_BYTES,
            FrameType::MissingPages => MAX_MISSING_BODY,
            _ => MAX_CONTROL_BODY,
        }
    }
}

/// Stable reasons for refusing or aborting a migration. The numbers are
/// part of the protocol and never reused; the strings are what users see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ReasonCode {
    /// A code this build does not know (sent by a newer peer).
    Unknown = 0,
    Cancelled = 1,
    Timeout = 2,
    ProgressTimeout = 3,
    PeerLost = 4,
    BadFrame = 5,
    BadCrc = 6,
    OutOfRange = 7,
    VersionMismatch = 8,
    Refused = 9,
    NotEnoughMemory = 10,
    VmExists = 11,
    Internal = 12,
    /// A well-formed frame arrived in a state where it is not allowed.
    Protocol = 13,
    Unauthorized = 14,
    /// The guest cannot run on the destination (CPU model, devices).
    Incompatible = 15,
    /// The pages the destination holds differ from the source's (a
    /// verification digest did not match).
    DigestMismatch = 16,
}

impl ReasonCode {
    pub const ALL: [ReasonCode; 17] = [
        Self::Unknown,
        Self::Cancelled,
        Self::Timeout,
        Self::ProgressTimeout,
        Self::PeerLost,
        Self::BadFrame,
        Self::BadCrc,
        Self::OutOfRange,
        Self::VersionMismatch,
        Self::Refused,
        Self::NotEnoughMemory,
        Self::VmExists,
        Self::Internal,
        Self::Protocol,
        Self::Unauthorized,
        Self::Incompatible,
        Self::DigestMismatch,
    ];

    /// Maps a wire value; codes from a newer peer become `Unknown`.
    pub fn from_u16(v: u16) -> Self {
        Self::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(Self::Unknown)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Cancelled => "cancelled",
            Self::Timeout => "timeout",
            Self::ProgressTimeout => "progress_timeout",
            Self::PeerLost => "peer_lost",
            Self::BadFrame => "bad_frame",
            Self::BadCrc => "bad_crc",
            Self::OutOfRange => "out_of_range",
            Self::VersionMismatch => "version_mismatch",
            Self::Refused => "refused",
            Self::NotEnoughMemory => "not_enough_memory",
            Self::VmExists => "vm_exists",
            Self::Internal => "internal",
            Self::Protocol => "protocol",
            Self::Unauthorized => "unauthorized",
            Self::Incompatible => "incompatible",
            Self::DigestMismatch => "digest_mismatch",
        }
    }
}

impl std::fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Optional protocol features, announced in `Hello` and intersected in
/// `HelloAck`. Unknown bits are ignored, so newer peers can add features.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Capabilities(pub u32);

impl Capabilities {
    /// zstd-compressed page batches.
    pub const ZSTD: Self = Self(1 << 0);
    /// `XorPageBatch`: dirty pages as zstd-compressed XOR deltas against
    /// the version of the page sent in an earlier pass.
    pub const XOR_DELTA: Self = Self(1 << 1);
    /// Post-copy: page requests and replies after switchover.
    pub const POSTCOPY: Self = Self(1 << 2);
    /// In a `Hello`: this connection resumes a post-copy migration whose
    /// previous connection broke (same migration id). Echoed in the
    /// `HelloAck` when the destination accepts the resume. Not part of
    /// `SUPPORTED`: it is never negotiated for a fresh migration.
    pub const RESUME: Self = Self(1 << 3);
    /// Every capability this build implements.
    pub const SUPPORTED: Self = Self(Self::ZSTD.0 | Self::XOR_DELTA.0 | Self::POSTCOPY.0);

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn intersect(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }
}

impl std::ops::BitOr for Capabilities {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// First frame, source to destination, on the control stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub capabilities: Capabilities,
    /// Most bulk streams the sender will open for page frames.
    pub max_streams: u16,
    pub host: String,
    pub migration_id: String,
    pub vm_name: String,
    pub layout: MemoryLayout,
}

/// The destination's acceptance: the version and the agreed features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloAck {
    pub version: u16,
    pub capabilities: Capabilities,
    pub max_streams: u16,
}

/// End of a pass; the counts let the receiver tell when every page frame
/// of the pass has arrived, whichever streams carried them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PassEnd {
    pub pass: u32,
    /// Pages sent with data (`PageBatch`/`CompressedPageBatch`).
    pub pages_sent: u64,
    /// Pages sent as `ZeroRun`s.
    pub zero_pages: u64,
    /// Wire bytes of the pass's page frames, headers included.
    pub bytes: u64,
}

/// Which pages a batch carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageSet {
    /// `count` consecutive pages from `first`.
    Run { first: PageIndex, count: u32 },
    /// Pages `first + offsets[i]`; offsets start at 0 and strictly increase.
    List { first: PageIndex, offsets: Vec<u32> },
}

impl PageSet {
    pub fn len(&self) -> usize {
        match self {
            PageSet::Run { count, .. } => *count as usize,
            PageSet::List { offsets, .. } => offsets.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn first(&self) -> PageIndex {
        match self {
            PageSet::Run { first, .. } | PageSet::List { first, .. } => *first,
        }
    }

    /// Pages from the first to one past the last one (the span the set
    /// covers, holes included).
    pub fn span(&self) -> u64 {
        match self {
            PageSet::Run { count, .. } => u64::from(*count),
            PageSet::List { offsets, .. } => offsets.last().map_or(0, |&o| u64::from(o) + 1),
        }
    }

    /// The page indexes in order. Call only on a validated set (as decoded
    /// or checked with [`Frame::check_layout`]), where nothing overflows.
    pub fn iter(&self) -> impl Iterator<Item = PageIndex> + '_ {
        let first = self.first().0;
        let (run, list) = match self {
            PageSet::Run { count, .. } => (0..u64::from(*count), &[][..]),
            PageSet::List { offsets, .. } => (0..0, &offsets[..]),
        };
        run.map(move |o| PageIndex(first.wrapping_add(o))).chain(
            list.iter()
                .map(move |&o| PageIndex(first.wrapping_add(u64::from(o)))),
        )
    }
}

/// Page data for the pages of `set`, in order, `set.len() * 4096` bytes.
///
/// `data` is [`PageData`] so that a decoded raw batch points into the
/// stream chunks it arrived in (or the one buffer of a frame that came in
/// one chunk) instead of being copied out of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBatch {
    pub pass: u32,
    pub set: PageSet,
    pub data: PageData,
}

/// Pages of `set` as XOR deltas: page `i` of the set becomes
/// `current ^ deltas[i * 4096..][..4096]`, where `current` is what the
/// receiver holds from an earlier pass, and must then have CRC32 `crcs[i]`.
///
/// `deltas` is the decompressed delta data (`set.len() * 4096` bytes); on
/// the wire it is one zstd frame, strictly smaller than the raw pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XorPageBatch {
    pub pass: u32,
    pub set: PageSet,
    /// CRC32 of each reconstructed page, in set order.
    pub crcs: Vec<u32>,
    pub deltas: Bytes,
}

/// What an `Ack` acknowledges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckWhat {
    /// Every page frame of this pass arrived and was written.
    Pass(u32),
    /// The `State` blob arrived.
    State,
}

/// One protocol message. Decoding either page batch type yields
/// [`Frame::PageBatch`] with raw page data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    HelloAck(HelloAck),
    Refuse {
        code: ReasonCode,
        message: String,
    },
    PassBegin {
        pass: u32,
    },
    PassEnd(PassEnd),
    ZeroRun {
        pass: u32,
        start: PageIndex,
        count: u64,
    },
    PageBatch(PageBatch),
    /// Dirty pages as XOR deltas (only when `XOR_DELTA` was agreed).
    XorPageBatch(XorPageBatch),
    /// Opaque device + vCPU state, at most [`MAX_STATE_BYTES`].
    State {
        blob: Vec<u8>,
    },
    /// Post-copy: the destination faulted on `count` pages from `index`.
    PageRequest {
        id: u64,
        index: PageIndex,
        count: u32,
    },
    /// Post-copy: the pages asked for by request `id`.
    PageReply {
        id: u64,
        index: PageIndex,
        data: Bytes,
    },
    /// The source is paused and sent everything (pre-copy), or hands the
    /// guest over with pages still missing (post-copy).
    Switchover {
        postcopy: bool,
    },
    /// The destination runs the guest; the source may tear it down.
    Done,
    Ack(AckWhat),
    Abort {
        code: ReasonCode,
        message: String,
    },
    /// Post-copy, destination to source: the guest runs here now (the end
    /// of the switchover downtime); `Done` follows once no page is missing.
    Resumed,
    /// Post-copy: part of a set of pages the destination lacks, as sorted,
    /// non-overlapping, non-empty ranges. Source to destination between
    /// `State` and `Switchover{postcopy}`; destination to source after a
    /// resume `HelloAck`. `last` marks the final chunk of the set.
    MissingPages {
        last: bool,
        ranges: Vec<PageRange>,
    },
    /// Post-copy, destination to source, right after `Done`: the fault
    /// numbers only the destination can measure, and its check of the
    /// pages received (for the source's migration record).
    PostcopyReport(PostcopyReport),
}

/// Body of [`Frame::PostcopyReport`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostcopyReport {
    /// Page requests the destination made (faults after its dedup).
    pub requests: u64,
    /// Request round trip (request sent to page installed), microseconds;
    /// 0 without samples.
    pub p50_us: u32,
    pub p99_us: u32,
    pub max_us: u32,
    /// The destination's check of the pages it received in post-copy.
    pub digest: PostcopyDigest,
}

/// What the destination found when it compared the digest of the pages it
/// received in post-copy with the source's; one byte on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PostcopyDigest {
    /// Verification was off (the source sent no digest).
    #[default]
    NotChecked = 0,
    /// The pages received match the source's digest.
    Matched = 1,
    /// The pages received differ from the source's.
    Mismatched = 2,
}

impl PostcopyDigest {
    /// Every value, in wire order.
    pub const ALL: [PostcopyDigest; 3] = [Self::NotChecked, Self::Matched, Self::Mismatched];

    /// Maps a wire value; `None` for a value no build defines.
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v)).copied()
    }

    /// The result as the source's record keeps it: `None` when not checked.
    pub fn matched(self) -> Option<bool> {
        match self {
            Self::NotChecked => None,
            Self::Matched => Some(true),
            Self::Mismatched => Some(false),
        }
    }
}

impl Frame {
    /// The wire type this frame is encoded as (raw for page batches).
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::HelloAck(_) => FrameType::HelloAck,
            Frame::Refuse { .. } => FrameType::Refuse,
            Frame::PassBegin { .. } => FrameType::PassBegin,
            Frame::PassEnd(_) => FrameType::PassEnd,
            Frame::ZeroRun { .. } => FrameType::ZeroRun,
            Frame::PageBatch(_) => FrameType::PageBatch,
            Frame::XorPageBatch(_) => FrameType::XorPageBatch,
            Frame::State { .. } => FrameType::State,
            Frame::PageRequest { .. } => FrameType::PageRequest,
            Frame::PageReply { .. } => FrameType::PageReply,
            Frame::Switchover { .. } => FrameType::Switchover,
            Frame::Done => FrameType::Done,
            Frame::Ack(_) => FrameType::Ack,
            Frame::Abort { .. } => FrameType::Abort,
            Frame::Resumed => FrameType::Resumed,
            Frame::MissingPages { .. } => FrameType::MissingPages,
            Frame::PostcopyReport(_) => FrameType::PostcopyReport,
        }
    }

    /// Checks every page this frame names against the negotiated layout;
    /// the error carries the first index outside it.
    pub fn check_layout(&self, layout: &MemoryLayout) -> Result<(), OutOfRange> {
        match self {
            Frame::ZeroRun { start, count, .. } => layout.check_range(*start, *count),
            Frame::PageBatch(b) => layout.check_range(b.set.first(), b.set.span()),
            Frame::XorPageBatch(b) => layout.check_range(b.set.first(), b.set.span()),
            Frame::PageRequest { index, count, .. } => {
                layout.check_range(*index, u64::from(*count))
            }
            Frame::PageReply { index, data, .. } => {
                layout.check_range(*index, (data.len() / PAGE_SIZE) as u64)
            }
            Frame::MissingPages { ranges, .. } => ranges
                .iter()
                .try_for_each(|r| layout.check_range(r.start, r.count)),
            _ => Ok(()),
        }
    }

    /// Encodes without compression, appending to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        encode::encode_frame(self, out)
    }

    /// Encodes into a fresh vector.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }
}

/// The decoded header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub frame_type: FrameType,
    pub body_len: u32,
    pub crc: u32,
}

impl FrameHeader {
    /// Header plus body length.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len as usize
    }
}

/// True if every byte of `page` is zero. Reads in 8-byte words: this runs
/// on every page of pass 0.
pub fn is_zero_page(page: &[u8]) -> bool {
    let chunks = page.chunks_exact(8);
    let rest = chunks.remainder();
    chunks
        .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .all(|w| w == 0)
        && rest.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_are_stable_and_named() {
        for (i, c) in ReasonCode::ALL.iter().enumerate() {
            assert_eq!(*c as u16 as usize, i);
            assert_eq!(ReasonCode::from_u16(i as u16), *c);
            assert!(c
                .as_str()
                .chars()
                .all(|ch| ch.is_ascii_lowercase() || ch == '_'));
        }
        assert_eq!(ReasonCode::from_u16(999), ReasonCode::Unknown);
        assert_eq!(ReasonCode::BadCrc.to_string(), "bad_crc");
    }

    #[test]
    fn postcopy_digest_round_trips_its_byte() {
        for d in PostcopyDigest::ALL {
            assert_eq!(PostcopyDigest::from_u8(d as u8), Some(d));
        }
        assert_eq!(PostcopyDigest::from_u8(3), None);
    }

    #[test]
    fn zero_page_detection() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero_page(&p));
        p[4095] = 1;
        assert!(!is_zero_page(&p));
        p[4095] = 0;
        p[0] = 0x80;
        assert!(!is_zero_page(&p));
    }

    #[test]
    fn page_set_iterates_in_order() {
        let s = PageSet::List {
            first: PageIndex(10),
            offsets: vec![0, 2, 5],
        };
        let v: Vec<u64> = s.iter().map(|p| p.0).collect();
        assert_eq!(v, [10, 12, 15]);
        assert_eq!(s.span(), 6);
        let r = PageSet::Run {
            first: PageIndex(3),
            count: 2,
        };
        assert_eq!(r.iter().map(|p| p.0).collect::<Vec<_>>(), [3, 4]);
    }
}
