//! Source side of post-copy: the switchover that hands over the set of
//! pages the destination lacks, the background push of those pages (nearest
//! to the latest request first), and resuming after a broken connection.
//!
//! Push order follows QEMU's idea: a fault at page `p` suggests the guest
//! works near `p`, so after answering a request for `p..p+n` the push
//! continues at `p+n`, wrapping around to the lowest page still unsent.

use super::{SourceError, SourceSession, SourceState};
use crate::codec::{Capabilities, Frame, FrameType, PageSet};
use crate::layout::{PageIndex, PageRange, PAGE_SIZE};
use crate::session::missing::PageBitmap;
use crate::session::PageSource;

/// Post-copy counters of one migration (the source's side of the record).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostcopyStats {
    /// Page requests answered (remote faults, as the destination saw them).
    pub requests_served: u64,
    /// Pages sent in replies.
    pub pages_served: u64,
    /// Pages sent by the background push.
    pub pages_pushed: u64,
    /// Wire bytes of the push frames, headers included.
    pub push_bytes: u64,
    /// Connections resumed after a break.
    pub resumes: u64,
}

/// What the source still has to push after a post-copy switchover.
#[derive(Debug)]
pub(super) struct Push {
    /// Pages the destination lacks that were not sent since the switchover
    /// or the last resume.
    to_push: PageBitmap,
    /// Where the push continues: just after the latest request.
    cursor: u64,
    /// Pass number the push frames carry (the one after the last acked).
    pass: u32,
    /// The destination's missing set, arriving in chunks during a resume.
    incoming: Option<PageBitmap>,
}

impl SourceSession {
    /// Post-copy switchover: appends `State`, the set of pages the
    /// destination must fetch (`missing`: sorted, non-overlapping ranges;
    /// it punches them out of its memory) and `Switchover{postcopy}`, all on
    /// the control stream. Afterwards push the set with
    /// [`next_push_frame`](Self::next_push_frame) while answering requests.
    pub fn send_state_postcopy(
        &mut self,
        blob: &[u8],
        missing: &[PageRange],
        out: &mut Vec<u8>,
    ) -> Result<(), SourceError> {
        self.expect("send_state_postcopy", self.state == SourceState::Idle)?;
        self.expect(
            "send_state_postcopy",
            self.agreed.contains(Capabilities::POSTCOPY),
        )?;
        let mut prev_end = 0;
        for r in missing {
            self.layout.check_range(r.start, r.count)?;
            if r.start.0 < prev_end {
                return Err(SourceError::UnsortedRanges);
            }
            prev_end = r.start.0 + r.count;
        }
        let to_push = PageBitmap::from_ranges(self.layout.total_pages(), missing);
        let start = out.len();
        let r = Frame::State {
            blob: blob.to_vec(),
        }
        .encode(out)
        .and_then(|()| to_push.to_frames().iter().try_for_each(|f| f.encode(out)))
        .and_then(|()| Frame::Switchover { postcopy: true }.encode(out));
        if let Err(e) = r {
            out.truncate(start);
            return Err(e.into());
        }
        self.push = Some(Push {
            to_push,
            cursor: 0,
            pass: self.next_pass,
            incoming: None,
        });
        self.state = SourceState::SwitchedOver { postcopy: true };
        self.postcopy_active = true;
        Ok(())
    }

    /// Pages not pushed or served yet (0 without a post-copy set).
    pub fn pages_to_push(&self) -> u64 {
        self.push.as_ref().map_or(0, |p| p.to_push.count())
    }

    /// Post-copy counters so far.
    pub fn postcopy_stats(&self) -> PostcopyStats {
        self.postcopy_stats
    }

    /// Appends the next background push frame (a page batch for a bulk
    /// stream): up to `batch_pages` unsent pages from the push cursor on.
    /// `None` when everything was sent (requests may still come).
    pub fn next_push_frame(
        &mut self,
        src: &(impl PageSource + ?Sized),
        out: &mut Vec<u8>,
    ) -> Result<Option<FrameType>, SourceError> {
        self.expect(
            "next_push_frame",
            self.state == SourceState::SwitchedOver { postcopy: true },
        )?;
        let Some(push) = self.push.as_mut() else {
            return Ok(None);
        };
        let Some(first) = push
            .to_push
            .next_from(push.cursor)
            .or_else(|| push.to_push.next_from(0))
        else {
            return Ok(None);
        };
        let mut data = std::mem::take(&mut self.scratch);
        data.clear();
        self.offsets.clear();
        let mut at = first.0;
        while self.offsets.len() < self.opts.batch_pages {
            let Some(index) = push.to_push.next_from(at) else {
                break;
            };
            let pos = data.len();
            data.resize(pos + PAGE_SIZE, 0);
            let page = data[pos..]
                .first_chunk_mut::<PAGE_SIZE>()
                .ok_or(SourceError::Options)?;
            if let Err(source) = src.read_page(index, page) {
                self.scratch = data;
                return Err(SourceError::ReadPage {
                    index: index.0,
                    source,
                });
            }
            // Layouts hold at most 2^28 pages, so offsets fit in u32.
            self.offsets.push((index.0 - first.0) as u32);
            at = index.0 + 1;
        }
        let n = self.offsets.len();
        let set = if self.offsets.last().is_some_and(|&o| o as usize + 1 == n) {
            PageSet::Run {
                first,
                count: n as u32,
            }
        } else {
            PageSet::List {
                first,
                offsets: self.offsets.clone(),
            }
        };
        let before = out.len();
        let r = self.encoder.encode_batch(push.pass, &set, &data, out);
        self.scratch = data;
        let ty = r?;
        for index in set.iter() {
            push.to_push.remove(index);
        }
        push.cursor = at;
        self.postcopy_stats.pages_pushed += n as u64;
        self.postcopy_stats.push_bytes += (out.len() - before) as u64;
        Ok(Some(ty))
    }

    /// A request for `count` pages from `index` was answered: those pages
    /// need no push, and the push continues right after them.
    pub(super) fn note_request(&mut self, index: PageIndex, count: u32) {
        self.postcopy_stats.requests_served += 1;
        self.postcopy_stats.pages_served += u64::from(count);
        if let Some(push) = self.push.as_mut() {
            for i in index.0..index.0 + u64::from(count) {
                push.to_push.remove(PageIndex(i));
            }
            push.cursor = index.0 + u64::from(count);
        }
    }

    /// After the connection broke in post-copy: appends a resume `Hello`
    /// for the new connection's control stream (same migration id, with
    /// [`Capabilities::RESUME`]). The destination answers with `HelloAck`
    /// and the pages it still lacks, which replace the push set
    /// ([`SourceEvent::ResumeAccepted`](super::SourceEvent::ResumeAccepted)).
    /// May be called again if a resume attempt broke too.
    pub fn resume(&mut self, out: &mut Vec<u8>) -> Result<(), SourceError> {
        let resumable = self.postcopy_active
            && matches!(
                self.state,
                SourceState::SwitchedOver { postcopy: true } | SourceState::Resuming { .. }
            );
        self.expect("resume", resumable)?;
        self.hello_frame(self.offered() | Capabilities::RESUME)
            .encode(out)?;
        if let Some(push) = self.push.as_mut() {
            push.incoming = None;
        }
        self.state = SourceState::Resuming { acked: false };
        Ok(())
    }

    /// `HelloAck` during a resume: the destination must echo `RESUME`.
    pub(super) fn resume_acked(&mut self, caps: Capabilities) -> Result<(), SourceError> {
        if !caps.contains(Capabilities::RESUME) {
            return Err(SourceError::Unexpected {
                frame: FrameType::HelloAck,
                state: self.state,
            });
        }
        self.state = SourceState::Resuming { acked: true };
        Ok(())
    }

    /// A chunk of the destination's missing set during a resume; on the
    /// last one the set becomes the push set and the count is returned.
    pub(super) fn resume_missing(
        &mut self,
        last: bool,
        ranges: &[PageRange],
    ) -> Result<Option<u64>, SourceError> {
        for r in ranges {
            self.layout.check_range(r.start, r.count)?;
        }
        let pages = self.layout.total_pages();
        let pass = self.next_pass;
        let push = self.push.get_or_insert_with(|| Push {
            to_push: PageBitmap::new(pages),
            cursor: 0,
            pass,
            incoming: None,
        });
        let incoming = push.incoming.get_or_insert_with(|| PageBitmap::new(pages));
        ranges.iter().for_each(|r| incoming.insert_range(*r));
        if !last {
            return Ok(None);
        }
        push.to_push = push.incoming.take().unwrap_or_default();
        let missing = push.to_push.count();
        self.postcopy_stats.resumes += 1;
        self.state = SourceState::SwitchedOver { postcopy: true };
        Ok(Some(missing))
    }
}
