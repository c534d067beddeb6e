//! Guest RAM: one memfd holding every region back to back (see
//! [`layout`](crate::layout)), mapped `MAP_SHARED` so that the VMM (which
//! hands the range to KVM) and the daemon (which reads and writes pages for
//! migration) see the same bytes.
//!
//! The guest may be running while we touch its memory, so nothing here hands
//! out a `&[u8]` over the mapping: accessors copy with raw pointers.
//!
//! A freshly created memfd is sparse. Never-touched ranges are holes that
//! read as zeros and cost no memory; [`GuestMemory::data_ranges`] finds the
//! rest with `SEEK_DATA`/`SEEK_HOLE`. Reading a hole through a shared shmem
//! mapping allocates a page for it, so whole-memory walks
//! ([`GuestMemory::digest`], migration pass 0) go through `data_ranges`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;

use memmap2::{MmapOptions, MmapRaw};
use thiserror::Error;
use xxhash_rust::xxh3::Xxh3;

use crate::layout::{Gpa, MemoryLayout, PAGE_SIZE};
use crate::page::Digest;

const PAGE: u64 = PAGE_SIZE as u64;

/// Bounce buffer for [`GuestMemory::digest`]: big enough to amortise the
/// hasher's per-call cost, small enough to stay in L2 between copy and hash.
/// Measured (digest_speed): 16 KiB..1 MiB all run at the speed of hashing a
/// plain buffer; 4 MiB is ~25% slower.
const DIGEST_CHUNK: usize = 64 << 10;

/// Zeros fed to the hasher for holes. Never written, so it stays cached.
static ZEROS: [u8; 256 << 10] = [0; 256 << 10];

/// Why an operation on guest memory failed.
#[derive(Debug, Error)]
pub enum GuestMemoryError {
    #[error("memfd name {name:?} contains a NUL byte")]
    InvalidName { name: String },
    #[error("cannot create memfd")]
    Create(#[source] io::Error),
    #[error("cannot size memfd to {bytes:#x} bytes")]
    Resize {
        bytes: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot stat memfd")]
    Stat(#[source] io::Error),
    #[error("memfd is {found:#x} bytes, layout needs {expected:#x}")]
    SizeMismatch { expected: u64, found: u64 },
    #[error("cannot map {bytes:#x} bytes of guest memory")]
    Map {
        bytes: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "access of {len:#x} bytes at offset {offset:#x} is outside guest memory ({size:#x} bytes)"
    )]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("access of {len:#x} bytes at gpa {gpa} is not all guest RAM")]
    NotRam { gpa: Gpa, len: u64 },
    #[error("pages {index}+{count} are outside guest memory ({total} pages)")]
    PagesOutOfRange { index: u64, count: u64, total: u64 },
    #[error("cannot seek memfd at offset {offset:#x}")]
    Seek {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot punch out pages {index}+{count}")]
    PunchHole {
        index: u64,
        count: u64,
        #[source]
        source: io::Error,
    },
}

/// Guest RAM backed by a memfd and mapped `MAP_SHARED`.
#[derive(Debug)]
pub struct GuestMemory {
    layout: MemoryLayout,
    // Declared before `file` so the mapping goes first; the mapping would
    // stay valid after close anyway, this just keeps the order obvious.
    map: MmapRaw,
    file: File,
}

impl GuestMemory {
    /// Creates a zero-filled (sparse) memfd of `layout.total_bytes()` and maps it.
    ///
    /// The memfd is sealed against shrinking and growing: a shrunk memfd
    /// would turn accesses past its new end into SIGBUS in every process
    /// that maps it.
    pub fn create(name: &str, layout: MemoryLayout) -> Result<Self, GuestMemoryError> {
        let cname = CString::new(name).map_err(|_| GuestMemoryError::InvalidName {
            name: name.to_owned(),
        })?;
        // SAFETY: `cname` is a valid NUL-terminated string that outlives the
        // call; memfd_create only reads it.
        let fd = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(GuestMemoryError::Create(io::Error::last_os_error()));
        }
        // SAFETY: memfd_create just returned this fd and nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let bytes = layout.total_bytes();
        file.set_len(bytes)
            .map_err(|source| GuestMemoryError::Resize { bytes, source })?;
        seal_size(&file);
        Self::map(file, layout)
    }

    /// Maps an existing memfd (e.g. received from the VMM over SCM_RIGHTS).
    /// Its size must equal `layout.total_bytes()`. Seals it against resizing
    /// if it allows sealing; sealed before the size check so the checked
    /// size cannot change under the mapping afterwards.
    pub fn from_fd(fd: OwnedFd, layout: MemoryLayout) -> Result<Self, GuestMemoryError> {
        let file = File::from(fd);
        seal_size(&file);
        let found = file.metadata().map_err(GuestMemoryError::Stat)?.len();
        let expected = layout.total_bytes();
        if found != expected {
            return Err(GuestMemoryError::SizeMismatch { expected, found });
        }
        Self::map(file, layout)
    }

    fn map(file: File, layout: MemoryLayout) -> Result<Self, GuestMemoryError> {
        let bytes = layout.total_bytes();
        let len = usize::try_from(bytes).map_err(|_| GuestMemoryError::Map {
            bytes,
            source: io::Error::from(io::ErrorKind::OutOfMemory),
        })?;
        // map_raw maps MAP_SHARED read/write and hands back a raw pointer
        // only, which is what memory shared with a running guest needs.
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|source| GuestMemoryError::Map { bytes, source })?;
        Ok(GuestMemory { layout, map, file })
    }

    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The memfd, e.g. to pass to another process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Start of the mapping (file offset 0). Valid for [`len`](Self::len)
    /// bytes as long as `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Bytes of guest RAM (the mapping's and the memfd's size).
    pub fn len(&self) -> u64 {
        self.layout.total_bytes()
    }

    /// Always false: a layout has at least one 2 MiB region.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Host address of guest-physical `gpa`, or `None` if it is not RAM.
    pub fn host_addr(&self, gpa: Gpa) -> Option<*mut u8> {
        let offset = self.layout.gpa_to_offset(gpa)?;
        // SAFETY: gpa_to_offset only returns offsets below total_bytes(),
        // which is the mapping's length, so the result stays inside it.
        Some(unsafe { self.as_ptr().add(offset as usize) })
    }

    /// Host address of page `index`, or `None` past the end.
    pub fn page_addr(&self, index: u64) -> Option<*mut u8> {
        if index >= self.layout.total_pages() {
            return None;
        }
        // SAFETY: index < total_pages, so index * PAGE < total_bytes, the
        // mapping's length.
        Some(unsafe { self.as_ptr().add((index * PAGE) as usize) })
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), GuestMemoryError> {
        let len = len as u64;
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(GuestMemoryError::OutOfRange {
                offset,
                len,
                size: self.len(),
            }),
        }
    }

    /// Copies `buf.len()` bytes from memfd offset `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        self.check_range(offset, buf.len())?;
        // SAFETY: check_range proved offset..offset+len lies inside the
        // mapping, which lives as long as `self`; `buf` is a distinct Rust
        // allocation, so the two cannot overlap. The guest may write the
        // source concurrently; we copy bytes and never form a reference to it.
        unsafe {
            ptr::copy_nonoverlapping(
                self.as_ptr().add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        Ok(())
    }

    /// Copies `buf` to memfd offset `offset`.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), GuestMemoryError> {
        self.check_range(offset, buf.len())?;
        // SAFETY: as in read_at: the destination is inside the live, writable
        // (PROT_WRITE, MAP_SHARED) mapping and `buf` cannot alias it. No Rust
        // reference to guest memory exists, so writing through the pointer
        // while others access it breaks no aliasing rule of ours.
        unsafe {
            ptr::copy_nonoverlapping(buf.as_ptr(), self.as_ptr().add(offset as usize), buf.len());
        }
        Ok(())
    }

    /// Splits `gpa..gpa+len` into (memfd offset, piece length) pieces, one
    /// per region it crosses; fails unless every byte is RAM.
    fn gpa_pieces(&self, gpa: Gpa, len: usize) -> Result<Vec<(u64, usize)>, GuestMemoryError> {
        let err = || GuestMemoryError::NotRam {
            gpa,
            len: len as u64,
        };
        let mut pieces = Vec::new();
        let mut at = gpa;
        let mut left = len as u64;
        while left > 0 {
            let r = self.layout.region_for_gpa(at).ok_or_else(err)?;
            let n = left.min(r.gpa_end() - at.0);
            pieces.push((r.file_offset + (at.0 - r.gpa.0), n as usize));
            left -= n;
            at = at.checked_add(n).ok_or_else(err)?;
        }
        Ok(pieces)
    }

    /// Copies `buf.len()` bytes from guest-physical `gpa`; may cross regions
    /// that are adjacent in gpa, but not the MMIO hole.
    pub fn read_gpa(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        let mut done = 0;
        for (offset, n) in self.gpa_pieces(gpa, buf.len())? {
            self.read_at(offset, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Copies `buf` to guest-physical `gpa` (same rules as [`read_gpa`](Self::read_gpa)).
    pub fn write_gpa(&self, gpa: Gpa, buf: &[u8]) -> Result<(), GuestMemoryError> {
        let mut done = 0;
        for (offset, n) in self.gpa_pieces(gpa, buf.len())? {
            self.write_at(offset, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn check_pages(&self, index: u64, count: u64) -> Result<(), GuestMemoryError> {
        if self.layout.contains_pages(index, count) {
            Ok(())
        } else {
            Err(GuestMemoryError::PagesOutOfRange {
                index,
                count,
                total: self.layout.total_pages(),
            })
        }
    }

    /// Copies page `index` out.
    pub fn read_page(&self, index: u64, out: &mut [u8; PAGE_SIZE]) -> Result<(), GuestMemoryError> {
        self.check_pages(index, 1)?;
        self.read_at(index * PAGE, out)
    }

    /// Copies `data` into page `index`.
    pub fn write_page(&self, index: u64, data: &[u8; PAGE_SIZE]) -> Result<(), GuestMemoryError> {
        self.check_pages(index, 1)?;
        self.write_at(index * PAGE, data)
    }

    /// lseek with SEEK_DATA/SEEK_HOLE; `None` when there is no such position
    /// at or after `offset` (ENXIO).
    fn seek(&self, offset: u64, whence: libc::c_int) -> Result<Option<u64>, GuestMemoryError> {
        // SAFETY: lseek on an fd we own; it only moves the file position,
        // which nothing else here relies on (all I/O goes via the mapping).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let source = io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(GuestMemoryError::Seek { offset, source })
        }
    }

    /// Page-index ranges that hold data, ascending and non-adjacent. All
    /// other pages are holes: they read as zero, and are never touched here.
    /// A snapshot: a running guest can turn holes into data right after.
    pub fn data_ranges(&self) -> Result<Vec<Range<u64>>, GuestMemoryError> {
        let size = self.len();
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut pos = 0;
        while pos < size {
            let Some(data) = self.seek(pos, libc::SEEK_DATA)? else {
                break;
            };
            // A file always has an implicit hole at EOF, so SEEK_HOLE past
            // data succeeds; `None` would only come from a racing truncate.
            let hole = self.seek(data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
            // shmem reports page granularity; round outwards regardless so
            // no data byte is ever dropped.
            let start = data / PAGE;
            let end = hole.div_ceil(PAGE);
            match out.last_mut() {
                Some(last) if last.end >= start => last.end = last.end.max(end),
                _ => out.push(start..end),
            }
            if hole <= pos {
                break; // cannot happen for a sane fs; never loop forever
            }
            pos = hole;
        }
        Ok(out)
    }

    /// Frees `count` pages from `index` (fallocate PUNCH_HOLE): they read
    /// as zero afterwards and, for post-copy, fault as missing.
    pub fn punch_hole(&self, index: u64, count: u64) -> Result<(), GuestMemoryError> {
        self.check_pages(index, count)?;
        if count == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on an fd we own over a range checked to be inside
        // the file; it changes file contents only, and the mapping stays
        // valid (punched pages read back as zero).
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (index * PAGE) as libc::off_t,
                (count * PAGE) as libc::off_t,
            )
        };
        if r < 0 {
            return Err(GuestMemoryError::PunchHole {
                index,
                count,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// xxh3-128 of all guest memory in page-index order, equal to
    /// [`Digest::of_bytes`] over the plain contents. Holes are fed to the
    /// hasher as zeros without reading (and so allocating) them.
    ///
    /// Only meaningful while the guest is paused. If the memfd cannot be
    /// seeked, every page is read instead: same value, more memory.
    pub fn digest(&self) -> Digest {
        self.digest_chunked(DIGEST_CHUNK)
    }

    /// [`digest`](Self::digest) with a given bounce-buffer size (tuning only).
    pub(crate) fn digest_chunked(&self, chunk: usize) -> Digest {
        let size = self.len();
        let all_pages: Range<u64> = 0..self.layout.total_pages();
        let ranges = self.data_ranges().unwrap_or_else(|_| vec![all_pages]);
        let mut hasher = Xxh3::new();
        let mut buf = vec![0u8; chunk];
        let mut pos = 0;
        for r in ranges {
            let (start, end) = (r.start * PAGE, (r.end * PAGE).min(size));
            feed_zeros(&mut hasher, start - pos);
            let mut at = start;
            while at < end {
                let n = (end - at).min(chunk as u64) as usize;
                // Within bounds: data_ranges only returns pages inside the file.
                if self.read_at(at, &mut buf[..n]).is_err() {
                    buf[..n].fill(0);
                }
                hasher.update(&buf[..n]);
                at += n as u64;
            }
            pos = end;
        }
        feed_zeros(&mut hasher, size - pos);
        Digest(hasher.digest128())
    }
}

fn feed_zeros(hasher: &mut Xxh3, mut bytes: u64) {
    while bytes > 0 {
        let n = bytes.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..n]);
        bytes -= n as u64;
    }
}

/// Best effort: forbid resizing the memfd. Fails harmlessly on fds created
/// without MFD_ALLOW_SEALING; the size check in from_fd still applies.
fn seal_size(file: &File) {
    // SAFETY: F_ADD_SEALS on an fd we own takes an int flag set and touches
    // no memory of ours.
    unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        );
    }
}

#[cfg(test)]
#[path = "memory_tests.rs"]
mod tests;
