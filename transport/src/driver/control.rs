//! The destination's queue of control frames for its writer task: bounded,
//! yet filled from code that must not wait.
//!
//! The destination only answers the source (hello-ack, acks, `Done`, ...),
//! one or two frames per source frame, except a resume, whose answer is the
//! hello-ack plus the missing set in chunks of up to 64 KiB. Those answers
//! are produced while an inbound frame is handled, which must not await
//! (that keeps `next_event` cancel-safe), so what does not fit waits in a
//! `held` list until the driver moves it on, before it takes the next
//! inbound frame or returns an event. `held` therefore never holds more
//! than one frame's answers.
//!
//! No deadlock: moving held frames on waits only for the writer, which
//! waits only for the source to read its control stream. The source reads
//! it in a task of its own, whatever its driver is doing, as long as its
//! driver keeps up with the few answers it asked for (it waits for each at
//! the protocol step that asked for it). So the wait never depends on this
//! side reading its inbound frames, and a source that stops reading stalls
//! this side instead of growing its memory.

use std::collections::VecDeque;

use tokio::sync::mpsc;

/// Frames queued for the writer: 64 send a resume of up to ~250,000
/// missing ranges in one go and bound the queue at ~4 MiB.
pub(super) const CONTROL_FRAMES: usize = 64;

/// The writer went away (it failed, or finished).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct WriterGone;

/// The sending side of the control queue.
#[derive(Debug)]
pub(super) struct ControlQueue {
    tx: mpsc::Sender<Vec<u8>>,
    /// Encoded frames that did not fit, oldest first.
    held: VecDeque<Vec<u8>>,
}

impl ControlQueue {
    /// A queue of [`CONTROL_FRAMES`] and the writer's end of it.
    pub(super) fn new() -> (Self, mpsc::Receiver<Vec<u8>>) {
        Self::with_capacity(CONTROL_FRAMES)
    }

    fn with_capacity(frames: usize) -> (Self, mpsc::Receiver<Vec<u8>>) {
        let (tx, rx) = mpsc::channel(frames);
        let held = VecDeque::new();
        (Self { tx, held }, rx)
    }

    /// Queues an encoded frame without waiting: in the queue if it has
    /// room and nothing is held, else held until [`release`](Self::release).
    /// Dropped if the writer is gone (whoever waits on it learns why).
    pub(super) fn push_now(&mut self, buf: Vec<u8>) {
        if !self.held.is_empty() {
            self.held.push_back(buf);
            return;
        }
        match self.tx.try_send(buf) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(buf)) => self.held.push_back(buf),
        }
    }

    /// Moves the held frames into the queue, waiting for room. Cancel-safe:
    /// a frame leaves `held` only together with its place in the queue.
    /// Held frames are dropped if the writer is gone.
    pub(super) async fn release(&mut self) {
        while !self.held.is_empty() {
            let Ok(permit) = self.tx.reserve().await else {
                self.held.clear();
                return;
            };
            if let Some(buf) = self.held.pop_front() {
                permit.send(buf);
            }
        }
    }

    /// Queues a frame after the held ones, waiting for room.
    pub(super) async fn send(&mut self, buf: Vec<u8>) -> Result<(), WriterGone> {
        self.release().await;
        self.tx.send(buf).await.map_err(|_| WriterGone)
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn frame(i: u8) -> Vec<u8> {
        vec![i]
    }

    /// Futures are polled by hand, so each step is deterministic.
    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[test]
    fn frames_beyond_the_capacity_are_held_and_keep_their_order() {
        let (mut q, mut rx) = ControlQueue::with_capacity(2);
        for i in 0..5 {
            q.push_now(frame(i));
        }
        assert_eq!(q.held.len(), 3);
        {
            let release = pin!(q.release());
            assert!(release.poll(&mut cx()).is_pending(), "no room yet");
        }
        assert_eq!(q.held.len(), 3, "a cancelled release loses nothing");
        let mut got = Vec::new();
        let mut release = pin!(q.release());
        while release.as_mut().poll(&mut cx()).is_pending() {
            got.push(rx.try_recv().expect("release waits only on a full queue")[0]);
        }
        while let Ok(f) = rx.try_recv() {
            got.push(f[0]);
        }
        assert_eq!(got, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_frame_sent_after_held_ones_goes_after_them() {
        let (mut q, mut rx) = ControlQueue::with_capacity(1);
        q.push_now(frame(0));
        q.push_now(frame(1));
        let mut send = pin!(q.send(frame(2)));
        assert!(send.as_mut().poll(&mut cx()).is_pending());
        assert_eq!(rx.try_recv(), Ok(frame(0)));
        assert!(send.as_mut().poll(&mut cx()).is_pending());
        assert_eq!(rx.try_recv(), Ok(frame(1)));
        assert_eq!(send.as_mut().poll(&mut cx()), Poll::Ready(Ok(())));
        assert_eq!(rx.try_recv(), Ok(frame(2)));
    }

    #[test]
    fn a_gone_writer_drops_frames_and_fails_sends() {
        let (mut q, rx) = ControlQueue::with_capacity(1);
        q.push_now(frame(0));
        q.push_now(frame(1));
        drop(rx);
        assert!(pin!(q.release()).poll(&mut cx()).is_ready());
        assert!(q.held.is_empty());
        q.push_now(frame(2));
        assert!(q.held.is_empty());
        let send = pin!(q.send(frame(3)));
        assert_eq!(send.poll(&mut cx()), Poll::Ready(Err(WriterGone)));
    }
}
