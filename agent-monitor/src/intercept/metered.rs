//! Bodies passed through frame by frame (never collected), counting their bytes; the response
//! side sends the request's report when it ends or is dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::body::{Body, Frame, SizeHint};

use super::{Reports, RequestReport};

/// The byte counts of one request, shared by its two bodies.
#[derive(Default, Debug)]
pub struct Counts {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// A report waiting for the end of its response.
pub struct Pending {
    pub report: RequestReport,
    pub started: Instant,
    pub reports: Reports,
    pub counts: Arc<Counts>,
}

impl Pending {
    pub fn finish(mut self) {
        self.report.bytes_in = self.counts.bytes_in.load(Ordering::Relaxed);
        self.report.bytes_out = self.counts.bytes_out.load(Ordering::Relaxed);
        self.report.duration = self.started.elapsed();
        self.reports.send(self.report);
    }
}

/// Which count a body adds to.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    /// From the agent to upstream.
    Out,
    /// From upstream to the agent.
    In,
}

pub struct Metered<B> {
    inner: B,
    counts: Arc<Counts>,
    direction: Direction,
    /// Sent when this body ends or is dropped (response bodies only).
    pending: Option<Pending>,
}

impl<B> Metered<B> {
    pub fn new(inner: B, counts: Arc<Counts>, direction: Direction) -> Self {
        Metered {
            inner,
            counts,
            direction,
            pending: None,
        }
    }

    pub fn reporting(mut self, pending: Pending) -> Self {
        self.pending = Some(pending);
        self
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish();
        }
    }
}

impl<B: Body + Unpin> Body for Metered<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = hyper::body::Buf::remaining(data) as u64;
                    let counter = match self.direction {
                        Direction::Out => &self.counts.bytes_out,
                        Direction::In => &self.counts.bytes_in,
                    };
                    counter.fetch_add(n, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(p) = self.pending.take() {
                    p.finish();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
