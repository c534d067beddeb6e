//! An in-process counting semaphore that grants strictly in arrival order.
//!
//! It mirrors the etcd semaphore on purpose (see `etcd.rs`): every waiter
//! takes a sequence number, and it holds a slot while fewer than `limit`
//! entries with a smaller number are still in the queue. Holders stay in the
//! queue until they release, so nobody can overtake an earlier waiter, and
//! a waiter learns its position before it is granted (what `migratectl`
//! shows for a Pending migration). Tickets and permits leave the queue when
//! dropped, so a cancelled wait never leaks a slot.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// The semaphore. Shared by `Arc`: tickets keep it alive.
#[derive(Debug)]
pub(crate) struct Fifo {
    limit: usize,
    queue: Mutex<Queue>,
    /// Bumped on every departure; waiters re-check their position on it.
    departures: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Queue {
    next: u64,
    /// Sequence numbers of holders and waiters, oldest first.
    entries: BTreeSet<u64>,
}

impl Fifo {
    /// A semaphore with `limit` slots (0 is read as 1: a limit of zero
    /// would wait forever, and config validation refuses it anyway).
    pub(crate) fn new(limit: u32) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1) as usize,
            queue: Mutex::new(Queue::default()),
            departures: watch::channel(0).0,
        })
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // A panic elsewhere cannot leave `Queue` half-updated (each change
        // is one insert or remove), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place at the end of the queue.
    pub(crate) fn enqueue(self: &Arc<Self>) -> FifoTicket {
        let mut q = self.queue();
        let seq = q.next;
        q.next += 1;
        q.entries.insert(seq);
        FifoTicket {
            fifo: Arc::clone(self),
            seq,
        }
    }

    /// Entries (holders and waiters) in the queue now.
    pub(crate) fn len(&self) -> usize {
        self.queue().entries.len()
    }

    /// Holders now: the first `limit` entries.
    pub(crate) fn held(&self) -> usize {
        self.len().min(self.limit)
    }

    fn ahead_of(&self, seq: u64) -> usize {
        self.queue().entries.range(..seq).count()
    }

    fn leave(&self, seq: u64) {
        if self.queue().entries.remove(&seq) {
            self.departures.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// A place in the queue, not yet (known to be) a slot.
#[derive(Debug)]
pub(crate) struct FifoTicket {
    fifo: Arc<Fifo>,
    seq: u64,
}

impl FifoTicket {
    /// Entries ahead of this one (holders included); it holds a slot when
    /// this is below the limit.
    pub(crate) fn ahead(&self) -> usize {
        self.fifo.ahead_of(self.seq)
    }

    /// Waits until this entry holds a slot. Cancel-safe: dropping the
    /// future drops the ticket, which leaves the queue.
    pub(crate) async fn wait(self) -> FifoPermit {
        let mut departures = self.fifo.departures.subscribe();
        loop {
            // Mark the current value seen *before* checking, so a departure
            // between the check and the await still wakes us.
            departures.borrow_and_update();
            if self.ahead() < self.fifo.limit {
                return FifoPermit { _place: self };
            }
            // The sender lives in `self.fifo`, which we hold: never closed.
            let _ = departures.changed().await;
        }
    }
}

impl Drop for FifoTicket {
    fn drop(&mut self) {
        self.fifo.leave(self.seq);
    }
}

/// A held slot; released when dropped.
#[derive(Debug)]
pub(crate) struct FifoPermit {
    _place: FifoTicket,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grants_in_arrival_order_and_never_over_the_limit() {
        let fifo = Fifo::new(2);
        let tickets: Vec<_> = (0..5).map(|_| fifo.enqueue()).collect();
        assert_eq!(
            tickets.iter().map(|t| t.ahead()).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        let (tx, mut rx) = tokio::sync::mpsc::channel(5);
        let mut releases = Vec::new();
        for (i, t) in tickets.into_iter().enumerate() {
            let tx = tx.clone();
            let (rel_tx, rel_rx) = tokio::sync::oneshot::channel::<()>();
            releases.push(Some(rel_tx));
            tokio::spawn(async move {
                let permit = t.wait().await;
                tx.send(i).await.unwrap();
                let _ = rel_rx.await;
                drop(permit);
            });
        }
        let mut order = Vec::new();
        for _ in 0..2 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(fifo.held(), 2);
        // Release in grant order; each release lets exactly the next one in.
        for k in 0..5 {
            releases[order[k]].take().unwrap().send(()).unwrap();
            if k + 2 < 5 {
                order.push(rx.recv().await.unwrap());
            }
            assert!(fifo.held() <= 2);
        }
        assert_eq!(order, [0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn a_dropped_wait_leaves_the_queue() {
        let fifo = Fifo::new(1);
        let holder = fifo.enqueue().wait().await;
        let waiter = fifo.enqueue();
        let third = fifo.enqueue();
        assert_eq!(third.ahead(), 2);
        // Poll the wait once (it cannot be granted), then drop it.
        let mut wait = Box::pin(waiter.wait());
        tokio::select! {
            biased;
            _ = &mut wait => panic!("granted while the slot was held"),
            () = std::future::ready(()) => {}
        }
        drop(wait);
        assert_eq!(third.ahead(), 1);
        drop(holder);
        let _p = third.wait().await;
        assert_eq!(fifo.len(), 1);
    }
}
