//! Guest RAM for migrated: a memfd shared between the VMM and the daemon,
//! its guest-physical layout and dense page addressing, dirty-page bitmaps in
//! KVM's layout, zero-page detection and hashing for verification, and
//! userfaultfd registration and fault serving for post-copy.
//!
//! Linux only; depends on no other crate of the workspace.

pub mod bitmap;
pub mod layout;
pub mod memory;
pub mod page;
pub mod uffd;

pub use bitmap::{BitmapError, DirtyBitmap, DirtyRange};
pub use layout::{Gpa, LayoutError, MemoryLayout, Pfn, Region, PAGE_SIZE, REGION_ALIGN};
pub use memory::{GuestMemory, GuestMemoryError};
pub use page::{is_zero_page, page_hash, Digest, ParseDigestError};
pub use uffd::{Installed, Pager, PagerError, PagerRegion, Userfaultfd, UserfaultfdError};

// Offsets into the mapping are u64 converted with `as usize`; that is only
// lossless where usize is 64 bits (and KVM hosts are).
#[cfg(not(target_pointer_width = "64"))]
compile_error!("guestmem supports 64-bit hosts only");
