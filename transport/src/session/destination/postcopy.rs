//! Destination side of post-copy: the missing-page set announced at
//! switchover, installing pushed pages and replies only where a page is
//! still missing (a page the guest already got, and may have written since,
//! is never overwritten), `Resumed`/`Done`, and resuming on a new
//! connection after the old one broke.

use super::{DestAction, DestError, DestState, DestinationSession};
use crate::codec::{
    Capabilities, Frame, FrameType, Hello, HelloAck, PageData, PageSet, ReasonCode,
    PROTOCOL_VERSION,
};
use crate::layout::{PageIndex, PageRange, PAGE_SIZE};
use crate::session::missing::PageBitmap;
use crate::session::PageSink;

/// Post-copy counters of one migration (the destination's side).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestPostcopyStats {
    /// Pages missing at switchover.
    pub missing_at_switchover: u64,
    /// Page requests made (remote faults after the caller's dedup).
    pub requests: u64,
    /// Pages installed from replies.
    pub pages_from_replies: u64,
    /// Pages installed from the background push.
    pub pages_from_push: u64,
    /// Pages that arrived again after they were installed (dropped).
    pub duplicate_pages: u64,
    /// Connections resumed after a break.
    pub resumes: u64,
}

impl DestinationSession {
    /// True while post-copy pages are tracked (the switchover named them).
    pub(super) fn tracks_missing(&self) -> bool {
        self.missing.is_some()
    }

    /// Pages still missing (0 without a post-copy set).
    pub fn missing_count(&self) -> u64 {
        self.missing.as_ref().map_or(0, PageBitmap::count)
    }

    /// True if `index` still has to come from the source.
    pub fn is_missing(&self, index: PageIndex) -> bool {
        self.missing.as_ref().is_some_and(|m| m.contains(index))
    }

    /// The pages still missing, as sorted runs: after
    /// [`DestAction::SwitchedOver`] these are the pages to punch out of
    /// guest memory before registering it with userfaultfd.
    pub fn missing_ranges(&self) -> Vec<PageRange> {
        self.missing
            .as_ref()
            .map(PageBitmap::ranges)
            .unwrap_or_default()
    }

    /// Post-copy counters so far.
    pub fn postcopy_stats(&self) -> DestPostcopyStats {
        self.postcopy_stats
    }

    /// Requests sent and not answered yet, as frames to send again after a
    /// resume (same ids).
    pub fn outstanding_requests(&self) -> Vec<Frame> {
        let mut v: Vec<Frame> = self
            .requests
            .iter()
            .map(|(&id, &(index, count))| Frame::PageRequest { id, index, count })
            .collect();
        v.sort_by_key(|f| match f {
            Frame::PageRequest { id, .. } => *id,
            _ => 0,
        });
        v
    }

    /// `Done` once the guest was resumed here and nothing is missing; the
    /// session is then `Done`. Check after [`resumed`](Self::resumed) (the
    /// frame handlers push it as [`DestAction::Send`] themselves).
    pub fn take_done(&mut self) -> Option<Frame> {
        let complete = self.resumed_sent
            && self.state == (DestState::SwitchedOver { postcopy: true })
            && self.missing.as_ref().is_some_and(PageBitmap::is_empty);
        if complete {
            self.state = DestState::Done;
            Some(Frame::Done)
        } else {
            None
        }
    }

    pub(super) fn maybe_done(&mut self, actions: &mut Vec<DestAction>) {
        if let Some(done) = self.take_done() {
            actions.push(DestAction::Send(done));
            actions.push(DestAction::PostcopyComplete);
        }
    }

    /// A chunk of the missing set between `State` and `Switchover`.
    pub(super) fn missing_chunk(
        &mut self,
        last: bool,
        ranges: &[PageRange],
    ) -> Result<(), DestError> {
        if self.missing_complete || !self.agreed.contains(Capabilities::POSTCOPY) {
            return Err(DestError::Unexpected {
                frame: FrameType::MissingPages,
                state: self.state,
            });
        }
        let pages = self
            .layout()
            .map(|l| l.total_pages())
            .ok_or(DestError::Failed)?;
        for r in ranges {
            self.layout_checked(|l| l.check_range(r.start, r.count))?;
        }
        let set = self.missing.get_or_insert_with(|| PageBitmap::new(pages));
        ranges.iter().for_each(|r| set.insert_range(*r));
        self.missing_complete = last;
        if last {
            self.postcopy_stats.missing_at_switchover = set.count();
        }
        Ok(())
    }

    /// Writes the pages of `data` (consecutive from `first`) that are still
    /// missing, in runs; returns how many were written.
    pub(super) fn install<S: PageSink + ?Sized>(
        &mut self,
        first: PageIndex,
        data: &[u8],
        sink: &mut S,
    ) -> Result<u64, DestError> {
        let Some(missing) = self.missing.as_mut() else {
            // No tracked set (a switchover without one): write everything.
            sink.write_pages(first, data).map_err(DestError::Sink)?;
            return Ok((data.len() / PAGE_SIZE) as u64);
        };
        let pages = (data.len() / PAGE_SIZE) as u64;
        let mut written = 0;
        let mut i = 0;
        while i < pages {
            if !missing.contains(PageIndex(first.0 + i)) {
                i += 1;
                continue;
            }
            let mut end = i + 1;
            while end < pages && missing.contains(PageIndex(first.0 + end)) {
                end += 1;
            }
            let bytes = &data[i as usize * PAGE_SIZE..end as usize * PAGE_SIZE];
            sink.write_pages(PageIndex(first.0 + i), bytes)
                .map_err(DestError::Sink)?;
            // Marked only after a successful write: a failed one fails the
            // session, and a page is never counted as present unwritten.
            for j in i..end {
                missing.remove(PageIndex(first.0 + j));
            }
            written += end - i;
            i = end;
        }
        self.postcopy_stats.duplicate_pages += pages - written;
        Ok(written)
    }

    /// A pushed page batch after a post-copy switchover.
    pub(super) fn push_batch<S: PageSink + ?Sized>(
        &mut self,
        set: &PageSet,
        data: &PageData,
        sink: &mut S,
    ) -> Result<(), DestError> {
        // After a switchover the sink installs pages with UFFDIO_COPY, one
        // ioctl per call: a
        // batch that arrived in stream chunks is gathered first, so that
        // each run of missing pages is one call, not several per chunk.
        let gathered;
        let data: &[u8] = match data.contiguous() {
            Some(d) => d,
            None => {
                gathered = data.to_bytes();
                &gathered
            }
        };
        let mut written = 0;
        super::for_each_page_run(set, data, |index, bytes| {
            written += self.install(index, bytes, sink)?;
            Ok::<_, DestError>(())
        })?;
        self.postcopy_stats.pages_from_push += written;
        Ok(())
    }

    /// A pushed zero run after a post-copy switchover: zeroes the missing
    /// pages of it.
    pub(super) fn push_zero<S: PageSink + ?Sized>(
        &mut self,
        start: PageIndex,
        count: u64,
        sink: &mut S,
    ) -> Result<(), DestError> {
        let Some(missing) = self.missing.as_mut() else {
            return sink.write_zero(start, count).map_err(DestError::Sink);
        };
        let mut written = 0;
        for i in start.0..start.0 + count {
            if missing.contains(PageIndex(i)) {
                sink.write_zero(PageIndex(i), 1).map_err(DestError::Sink)?;
                missing.remove(PageIndex(i));
                written += 1;
            }
        }
        self.postcopy_stats.duplicate_pages += count - written;
        self.postcopy_stats.pages_from_push += written;
        Ok(())
    }

    /// The connection broke during post-copy: wait for the source's resume
    /// hello on a new connection (feed its frames to this same session).
    /// The missing set and unanswered requests are kept. Allowed after a
    /// post-copy switchover (also once `Done`, whose `Done` may have been
    /// lost) and again after a failed resume attempt.
    pub fn prepare_resume(&mut self) -> Result<(), DestError> {
        let back_to = match self.state {
            DestState::SwitchedOver { postcopy: true } | DestState::Done
                if self.tracks_missing() =>
            {
                self.state
            }
            DestState::AwaitResume => self.resume_to,
            state => {
                return Err(DestError::WrongState {
                    op: "prepare_resume",
                    state,
                })
            }
        };
        self.resume_to = back_to;
        self.input = crate::codec::FrameBuffer::new();
        self.state = DestState::AwaitResume;
        Ok(())
    }

    /// A hello while waiting for a resume: accepted only for the same
    /// migration, layout and version, with `RESUME` set. Anything else is
    /// refused and the session keeps waiting for a proper resume.
    pub(super) fn resume_hello(&mut self, h: Hello, actions: &mut Vec<DestAction>) {
        let original = self.hello.as_ref();
        let why = if h.version != PROTOCOL_VERSION {
            Some((ReasonCode::VersionMismatch, "version differs"))
        } else if !h.capabilities.contains(Capabilities::RESUME) {
            Some((
                ReasonCode::Protocol,
                "post-copy migration waits for a resume",
            ))
        } else if original.is_none_or(|o| o.migration_id != h.migration_id || o.layout != h.layout)
        {
            Some((ReasonCode::Protocol, "resume does not match the migration"))
        } else {
            None
        };
        if let Some((code, message)) = why {
            actions.push(DestAction::Send(Frame::Refuse {
                code,
                message: message.to_owned(),
            }));
            return;
        }
        actions.push(DestAction::Send(Frame::HelloAck(HelloAck {
            version: PROTOCOL_VERSION,
            capabilities: self.agreed | Capabilities::RESUME,
            max_streams: h.max_streams.min(self.opts.max_streams),
        })));
        let missing = self.missing.clone().unwrap_or_default();
        actions.extend(missing.to_frames().into_iter().map(DestAction::Send));
        self.state = self.resume_to;
        self.postcopy_stats.resumes += 1;
        actions.push(DestAction::ResumeAccepted {
            missing: missing.count(),
        });
        if self.state == DestState::Done {
            // The first Done may have died with the old connection.
            actions.push(DestAction::Send(Frame::Done));
        } else {
            self.maybe_done(actions);
        }
    }
}
