//! Recycled frame buffers.
//!
//! A page frame is ~512 KiB. Allocating one per frame made glibc hand the
//! memory back to the kernel and fault it in again (tens of thousands of
//! page faults per GiB moved, each zeroing a page). Both ends therefore
//! keep a few frame-sized buffers: a buffer handed out as [`Bytes`] (to
//! quinn on send, to the sink on receive) comes back to its pool when the
//! last view of it is dropped.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{HEADER_LEN, MAX_BATCH_BODY, MAX_XOR_BATCH_BODY};

/// Capacity of a pooled buffer: any page frame fits.
pub(crate) const POOLED_CAPACITY: usize = HEADER_LEN + max(MAX_BATCH_BODY, MAX_XOR_BATCH_BODY);

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// A bounded stack of spare frame buffers. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub(crate) struct BufferPool {
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
    keep: usize,
}

impl BufferPool {
    /// A pool that keeps at most `keep` spare buffers.
    pub(crate) fn new(keep: usize) -> Self {
        Self {
            spare: Arc::new(Mutex::new(Vec::new())),
            keep,
        }
    }

    /// An empty buffer with room for at least `capacity` bytes: a recycled
    /// one when `capacity` is frame-sized, else a fresh allocation.
    pub(crate) fn take(&self, capacity: usize) -> Vec<u8> {
        if capacity > POOLED_CAPACITY {
            return Vec::with_capacity(capacity);
        }
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match spare {
            Some(mut buf) => {
                buf.clear();
                buf
            }
            None => Vec::with_capacity(POOLED_CAPACITY),
        }
    }

    /// Wraps `buf` as [`Bytes`]; it returns to this pool once every view of
    /// it is dropped.
    pub(crate) fn bytes(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }

    fn give_back(&self, buf: Vec<u8>) {
        // Only frame-sized buffers: a 64 MiB state buffer is not kept.
        if buf.capacity() < POOLED_CAPACITY || buf.capacity() > 2 * POOLED_CAPACITY {
            return;
        }
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < self.keep {
            spare.push(buf);
        }
    }

    #[cfg(test)]
    fn spare(&self) -> usize {
        self.spare.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The owner behind a pooled [`Bytes`].
struct Pooled {
    buf: Vec<u8>,
    pool: BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_the_last_view_drops() {
        let pool = BufferPool::new(2);
        let mut buf = pool.take(100);
        assert!(buf.capacity() >= POOLED_CAPACITY);
        buf.extend_from_slice(b"hello world");
        let ptr = buf.as_ptr();
        let whole = pool.bytes(buf);
        let part = whole.slice(6..);
        drop(whole);
        assert_eq!(pool.spare(), 0, "a view is still alive");
        assert_eq!(&part[..], b"world");
        drop(part);
        assert_eq!(pool.spare(), 1);
        let again = pool.take(10);
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), ptr, "the same allocation is reused");
    }

    #[test]
    fn keeps_at_most_keep_and_never_huge_buffers() {
        let pool = BufferPool::new(1);
        let a = pool.bytes(pool.take(1));
        let b = pool.bytes(pool.take(1));
        drop(a);
        drop(b);
        assert_eq!(pool.spare(), 1);
        let big = pool.take(POOLED_CAPACITY * 4);
        assert!(big.capacity() >= POOLED_CAPACITY * 4);
        drop(pool.bytes(big));
        assert_eq!(pool.spare(), 1);
    }
}
