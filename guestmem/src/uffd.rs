//! userfaultfd for post-copy: the VMM registers its mapping of guest RAM in
//! MISSING mode ([`Userfaultfd`]) and hands the fd to the daemon, whose
//! [`Pager`] reads the faults and installs pages with `UFFDIO_COPY`.
//!
//! ```text
//! VMM                                    daemon
//!  Userfaultfd::create()
//!  register_memory(&mem)  ── fd + PagerRegions (SCM_RIGHTS) ──▶ Pager::new
//!  vCPU / KVM touches a hole: blocks        read_faults() → page indexes
//!                                           install(index, bytes) (wakes it)
//! ```
//!
//! Addresses: a [`PagerRegion`] ties a range of page indexes (memfd offset
//! / 4096, the dense addressing of [`layout`](crate::layout)) to the VMM's
//! host virtual address of its first page. `UFFDIO_COPY` takes destination
//! addresses in the *registering* process's address space, so the daemon
//! never needs its own mapping for this.
//!
//! The fd is created without `UFFD_USER_MODE_ONLY`: KVM reaches guest RAM
//! from kernel mode (get_user_pages when it maps a page for the vCPU; on a
//! shadow-paging host such as the nested PVM test host, also get_user when
//! it walks the guest's page tables) and those faults must wait for us
//! too, not fail with EFAULT. That needs access to `/dev/userfaultfd` or
//! CAP_SYS_PTRACE.
//!
//! Lifetime: registration ends when the last fd of the userfaultfd is
//! closed; any vCPU still waiting is then woken and, for a shmem mapping,
//! sees whatever the memfd holds (zeros for holes). The VMM therefore keeps
//! its own copy until the daemon says every page is installed (control
//! request `userfaultfd_release`, see vmm/CONTROL.md); a daemon that dies
//! early leaves vCPUs waiting, not reading zeros.
//!
//! Raw ioctls rather than the `userfaultfd` crate: its sys crate runs
//! bindgen at build time (libclang on every builder of the workspace), and
//! its `copy` turns a zero-progress EAGAIN into a huge byte count. The few
//! structs we need are defined here, with the ioctl numbers derived from
//! their sizes (checked against the kernel header values in tests).

use std::fs::OpenOptions;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::layout::{MemoryLayout, MAX_REGIONS, PAGE_SIZE};
use crate::memory::GuestMemory;

const PAGE: u64 = PAGE_SIZE as u64;

// --- kernel ABI (include/uapi/linux/userfaultfd.h) ---------------------

const UFFD_API: u64 = 0xaa;
const UFFDIO: u64 = 0xaa;
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const _UFFDIO_COPY: u64 = 0x03;
const _UFFDIO_ZEROPAGE: u64 = 0x04;
/// `_IO(0xAA, 0x00)` on /dev/userfaultfd: creates a userfaultfd.
const USERFAULTFD_IOC_NEW: u64 = UFFDIO << 8;
const DEV_USERFAULTFD: &str = "/dev/userfaultfd";

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    /// Bytes copied, or a negative errno when nothing was.
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    /// Bytes zeroed, or a negative errno when nothing was.
    zeropage: i64,
}

/// `struct uffd_msg`: event byte at 0; for a page fault, flags at 8 and the
/// faulting address at 16.
const MSG_LEN: usize = 32;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
/// `_IOR`: the kernel header declares UFFDIO_WAKE (and UNREGISTER) so.
const IOC_READ: u64 = 2;
const IOC_READ_WRITE: u64 = 3;
const UFFDIO_API: u64 = ioc(IOC_READ_WRITE, 0x3f, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(IOC_READ_WRITE, 0x00, size_of::<UffdioRegister>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(IOC_READ_WRITE, _UFFDIO_COPY, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = ioc(
    IOC_READ_WRITE,
    _UFFDIO_ZEROPAGE,
    size_of::<UffdioZeropage>(),
);

/// Marker for the argument structs above: `#[repr(C)]`, plain integers,
/// laid out as the kernel header declares them.
///
/// # Safety
/// Only for the structs of this module, whose request numbers encode their
/// own size.
unsafe trait UffdArg {}
// SAFETY: each is a #[repr(C)] copy of the kernel struct of that name.
unsafe impl UffdArg for UffdioApi {}
// SAFETY: as above.
unsafe impl UffdArg for UffdioRange {}
// SAFETY: as above.
unsafe impl UffdArg for UffdioRegister {}
// SAFETY: as above.
unsafe impl UffdArg for UffdioCopy {}
// SAFETY: as above.
unsafe impl UffdArg for UffdioZeropage {}

/// ioctl with an in/out argument struct; EINTR is retried by callers that
/// can (COPY reports progress, so it is not retried blindly here).
fn ioctl<T: UffdArg>(fd: RawFd, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `req` is one of the UFFDIO_* numbers above, each built from
    // size_of the matching UffdArg struct, so the kernel reads and writes
    // exactly the `T` that `arg` points to, which lives across the call.
    let r = unsafe { libc::ioctl(fd, req as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

// --- VMM side ------------------------------------------------------------

/// Why creating or registering a userfaultfd failed.
#[derive(Debug, Error)]
pub enum UserfaultfdError {
    #[error("cannot create a userfaultfd (needs /dev/userfaultfd or CAP_SYS_PTRACE)")]
    Create(#[source] io::Error),
    #[error("userfaultfd api handshake failed (shmem missing-page faults unsupported?)")]
    Api(#[source] io::Error),
    #[error("cannot register {len:#x} bytes at {addr:#x} for missing-page faults")]
    Register {
        addr: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("range at {addr:#x} does not offer UFFDIO_COPY (ioctls {ioctls:#x})")]
    NoCopy { addr: u64, ioctls: u64 },
}

/// A userfaultfd as the VMM creates it: close-on-exec, non-blocking, for
/// user- and kernel-mode faults, with shmem missing-page faults enabled.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// Opens one through `/dev/userfaultfd`, falling back to the syscall.
    pub fn create() -> Result<Self, UserfaultfdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let fd = match OpenOptions::new()
            .read(true)
            .write(true)
            .open(DEV_USERFAULTFD)
        {
            Ok(dev) => {
                // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and
                // returns a new fd; it touches no memory of ours.
                unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as libc::c_ulong, flags) }
            }
            // SAFETY: the userfaultfd syscall takes flags by value and
            // returns a new fd; it touches no memory of ours.
            Err(_) => unsafe { libc::syscall(libc::SYS_userfaultfd, flags) as libc::c_int },
        };
        if fd < 0 {
            return Err(UserfaultfdError::Create(io::Error::last_os_error()));
        }
        // SAFETY: the kernel just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_MISSING_SHMEM,
            ioctls: 0,
        };
        ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api).map_err(UserfaultfdError::Api)?;
        Ok(Userfaultfd { fd })
    }

    /// Registers `len` bytes at `addr` (page aligned) in MISSING mode:
    /// from now on any access to a page the backing file lacks waits until
    /// the fd's holder installs it. Registering changes no memory contents.
    pub fn register_missing(&self, addr: u64, len: u64) -> Result<(), UserfaultfdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg)
            .map_err(|source| UserfaultfdError::Register { addr, len, source })?;
        if reg.ioctls & (1 << _UFFDIO_COPY) == 0 {
            return Err(UserfaultfdError::NoCopy {
                addr,
                ioctls: reg.ioctls,
            });
        }
        Ok(())
    }

    /// Registers every region of `mem`'s mapping; returns where each is.
    pub fn register_memory(&self, mem: &GuestMemory) -> Result<Vec<PagerRegion>, UserfaultfdError> {
        let regions = PagerRegion::of_memory(mem);
        for r in &regions {
            self.register_missing(r.host_addr, r.pages * PAGE)?;
        }
        Ok(regions)
    }

    /// The fd, to hand to the process that will serve the faults.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

// --- daemon side ---------------------------------------------------------

/// Where one region of guest RAM lives in the registering (VMM) process:
/// page indexes `first_index..first_index + pages` start at `host_addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagerRegion {
    pub first_index: u64,
    pub pages: u64,
    pub host_addr: u64,
}

impl PagerRegion {
    /// One entry per layout region of `mem`, at this process's addresses.
    pub fn of_memory(mem: &GuestMemory) -> Vec<PagerRegion> {
        let base = mem.as_ptr() as u64;
        mem.layout()
            .regions()
            .iter()
            .map(|r| PagerRegion {
                first_index: r.first_index(),
                pages: r.pages(),
                host_addr: base + r.file_offset,
            })
            .collect()
    }

    fn end_index(&self) -> u64 {
        self.first_index + self.pages
    }
}

/// Why the pager refused its setup or failed to serve.
#[derive(Debug, Error)]
pub enum PagerError {
    #[error("pager regions do not match the memory layout: {reason}")]
    Regions { reason: &'static str },
    #[error("cannot make the userfaultfd non-blocking")]
    Nonblock(#[source] io::Error),
    #[error("cannot read userfaultfd events")]
    Read(#[source] io::Error),
    #[error("fault at {addr:#x} is outside every registered region")]
    FaultOutside { addr: u64 },
    #[error("{len} bytes is not a whole, non-zero number of pages")]
    NotPages { len: usize },
    #[error("pages {index}+{count} are outside guest memory")]
    OutOfRange { index: u64, count: u64 },
    #[error("cannot install pages {index}+{count}")]
    Copy {
        index: u64,
        count: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot wake waiters on pages {index}+{count}")]
    Wake {
        index: u64,
        count: u64,
        #[source]
        source: io::Error,
    },
}

/// What an install did, in pages.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Installed {
    /// Pages this call placed.
    pub copied: u64,
    /// Pages that were already present (installed before, or written
    /// through another mapping of the memfd); their waiters were woken.
    pub present: u64,
}

impl std::ops::AddAssign for Installed {
    fn add_assign(&mut self, o: Installed) {
        self.copied += o.copied;
        self.present += o.present;
    }
}

/// Consecutive no-progress EAGAINs after which an install gives up. EAGAIN
/// without progress means the VMM's address space is changing under us
/// (mremap, fork); ours never does that, so this only stops a livelock.
const MAX_STALLS: u32 = 10_000;

/// Serves missing-page faults of another process's guest RAM.
#[derive(Debug)]
pub struct Pager {
    fd: OwnedFd,
    /// Sorted by `first_index`, disjoint, matching the layout's regions.
    regions: Vec<PagerRegion>,
    total_pages: u64,
}

impl Pager {
    /// Takes the userfaultfd received from the VMM and the regions it
    /// reported, which must cover `layout`'s regions one for one. Puts the
    /// fd in non-blocking mode (a flag of the open file, so shared with the
    /// VMM's copy, which the VMM never reads).
    pub fn new(
        fd: OwnedFd,
        layout: &MemoryLayout,
        mut regions: Vec<PagerRegion>,
    ) -> Result<Self, PagerError> {
        let bad = |reason| PagerError::Regions { reason };
        if regions.len() > MAX_REGIONS || regions.len() != layout.regions().len() {
            return Err(bad("region count differs"));
        }
        regions.sort_by_key(|r| r.first_index);
        for (p, l) in regions.iter().zip(layout.regions()) {
            if p.first_index != l.first_index() || p.pages != l.pages() {
                return Err(bad("page ranges differ"));
            }
            if p.host_addr % PAGE != 0 {
                return Err(bad("host address not page aligned"));
            }
            if p.host_addr.checked_add(p.pages * PAGE).is_none() {
                return Err(bad("host range overflows"));
            }
        }
        set_nonblocking(&fd).map_err(PagerError::Nonblock)?;
        Ok(Pager {
            fd,
            regions,
            total_pages: layout.total_pages(),
        })
    }

    /// Pages of guest memory.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    fn region_of_index(&self, index: u64) -> Option<&PagerRegion> {
        let i = self.regions.partition_point(|r| r.end_index() <= index);
        self.regions.get(i).filter(|r| r.first_index <= index)
    }

    /// Page index of the VMM address `addr`, if it is guest RAM.
    pub fn index_of(&self, addr: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = addr.checked_sub(r.host_addr)?;
            (off < r.pages * PAGE).then(|| r.first_index + off / PAGE)
        })
    }

    /// VMM address of page `index`.
    pub fn addr_of(&self, index: u64) -> Option<u64> {
        let r = self.region_of_index(index)?;
        Some(r.host_addr + (index - r.first_index) * PAGE)
    }

    /// Appends the page index of every pending fault to `out` and returns
    /// how many it appended; 0 when none is pending (never blocks). The
    /// same page may appear more than once (several vCPUs, or a fault that
    /// was re-raised); installing it once serves all of them.
    pub fn read_faults(&self, out: &mut Vec<u64>) -> Result<usize, PagerError> {
        const BATCH: usize = 64;
        let mut buf = [0u8; MSG_LEN * BATCH];
        let mut added = 0;
        loop {
            // SAFETY: read() into a buffer we own, of the length passed.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(added),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(PagerError::Read(e)),
                }
            }
            let n = n as usize;
            // The kernel only hands out whole messages.
            for msg in buf[..n].chunks_exact(MSG_LEN) {
                if msg[0] != UFFD_EVENT_PAGEFAULT {
                    continue; // no other event was enabled
                }
                let addr = u64::from_ne_bytes(msg[16..24].try_into().expect("8 bytes"));
                let index = self
                    .index_of(addr)
                    .ok_or(PagerError::FaultOutside { addr })?;
                out.push(index);
                added += 1;
            }
            if n < buf.len() {
                return Ok(added);
            }
        }
    }

    /// Checks `index..index+count` and splits it into per-region runs of
    /// (first index, pages, VMM address).
    fn runs(&self, index: u64, count: u64) -> Result<Vec<(u64, u64, u64)>, PagerError> {
        let oor = PagerError::OutOfRange { index, count };
        if count == 0
            || index
                .checked_add(count)
                .is_none_or(|e| e > self.total_pages)
        {
            return Err(oor);
        }
        let mut runs = Vec::with_capacity(1);
        let (mut at, end) = (index, index + count);
        while at < end {
            let r = self
                .region_of_index(at)
                .ok_or(PagerError::OutOfRange { index, count })?;
            let n = (end - at).min(r.end_index() - at);
            runs.push((at, n, r.host_addr + (at - r.first_index) * PAGE));
            at += n;
        }
        Ok(runs)
    }

    /// Installs `data` (whole pages) as pages `first_index..` with
    /// UFFDIO_COPY, waking whoever waits on them. Pages already present are
    /// left alone, counted, and their waiters woken too.
    pub fn install(&self, first_index: u64, data: &[u8]) -> Result<Installed, PagerError> {
        if data.is_empty() || data.len() % PAGE_SIZE != 0 {
            return Err(PagerError::NotPages { len: data.len() });
        }
        let count = (data.len() / PAGE_SIZE) as u64;
        let mut done = Installed::default();
        let mut src = data.as_ptr() as u64;
        for (index, pages, dst) in self.runs(first_index, count)? {
            done += self.fill(index, pages, dst, |dst, len, done_bytes| {
                let mut c = UffdioCopy {
                    dst,
                    src: src + done_bytes,
                    len,
                    mode: 0,
                    copy: 0,
                };
                let r = ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c);
                (r, c.copy)
            })?;
            src += pages * PAGE;
        }
        Ok(done)
    }

    /// Installs `count` zero pages from `first_index` (UFFDIO_ZEROPAGE,
    /// which shmem supports; one shared zero source otherwise).
    pub fn install_zero(&self, first_index: u64, count: u64) -> Result<Installed, PagerError> {
        let mut done = Installed::default();
        for (index, pages, dst) in self.runs(first_index, count)? {
            done += self.fill(index, pages, dst, |dst, len, _| {
                let mut z = UffdioZeropage {
                    range: UffdioRange { start: dst, len },
                    mode: 0,
                    zeropage: 0,
                };
                let r = ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z);
                (r, z.zeropage)
            })?;
        }
        Ok(done)
    }

    /// Drives one fill ioctl over `pages` pages at VMM address `dst` until
    /// all are placed or found present. `op(dst, len, bytes_done)` runs the
    /// ioctl on the remainder and returns its result and progress field.
    fn fill(
        &self,
        index: u64,
        pages: u64,
        dst: u64,
        mut op: impl FnMut(u64, u64, u64) -> (io::Result<()>, i64),
    ) -> Result<Installed, PagerError> {
        let total = pages * PAGE;
        let mut done_bytes = 0u64;
        let mut out = Installed::default();
        let mut stalls = 0u32;
        while done_bytes < total {
            let (r, progress) = op(dst + done_bytes, total - done_bytes, done_bytes);
            // On success and on a partial copy the kernel stores the bytes
            // it placed (and has woken their waiters); otherwise -errno.
            let placed = u64::try_from(progress).unwrap_or(0).min(total - done_bytes);
            out.copied += placed / PAGE;
            done_bytes += placed / PAGE * PAGE;
            let Err(e) = r else {
                continue; // full success leaves done_bytes == total
            };
            match e.raw_os_error() {
                // Partial (stopped early, e.g. by a present page next) or
                // interrupted: go on from where it stopped.
                Some(libc::EAGAIN) | Some(libc::EINTR) => {
                    if placed == 0 {
                        stalls += 1;
                        if stalls > MAX_STALLS {
                            return Err(copy_err(index, pages, e));
                        }
                    } else {
                        stalls = 0;
                    }
                }
                // The first remaining page is already there. The kernel
                // did not wake its waiters; a vCPU may have faulted on it
                // before it appeared, so wake it, then skip it.
                Some(libc::EEXIST) => {
                    let at = index + done_bytes / PAGE;
                    self.wake_addr(at, dst + done_bytes, 1)?;
                    out.present += 1;
                    done_bytes += PAGE;
                    stalls = 0;
                }
                _ => return Err(copy_err(index + done_bytes / PAGE, pages, e)),
            }
        }
        Ok(out)
    }

    /// Wakes threads waiting on pages `index..index+count` without
    /// installing anything (for pages that became present another way).
    /// A woken thread whose page is still missing simply faults again.
    pub fn wake(&self, index: u64, count: u64) -> Result<(), PagerError> {
        for (at, pages, addr) in self.runs(index, count)? {
            self.wake_addr(at, addr, pages)?;
        }
        Ok(())
    }

    fn wake_addr(&self, index: u64, addr: u64, count: u64) -> Result<(), PagerError> {
        let mut range = UffdioRange {
            start: addr,
            len: count * PAGE,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut range).map_err(|source| PagerError::Wake {
            index,
            count,
            source,
        })
    }
}

fn copy_err(index: u64, count: u64, source: io::Error) -> PagerError {
    PagerError::Copy {
        index,
        count,
        source,
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own only change its status flags.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl AsRawFd for Pager {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Pager {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
#[path = "uffd_tests.rs"]
mod tests;
