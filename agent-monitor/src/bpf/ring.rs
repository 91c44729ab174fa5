//! The reader of the action ring buffer: hands out each record's bytes; decoding them is the
//! record model's business.

use anyhow::anyhow;
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

/// Readiness-driven reader of the action ring buffer.
pub struct ActionStream {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl ActionStream {
    /// Registers `ring` with tokio's reactor.
    pub(super) fn new(ring: RingBuf<MapData>) -> anyhow::Result<Self> {
        // SAFETY: the RingBuf owns its fd and keeps it open for as long as the AsyncFd holds it.
        let fd = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow!("registering the ring buffer with tokio: {e}"))?;
        Ok(ActionStream { fd })
    }

    /// Waits until records are available, then hands each to `f`. Returns how many were read.
    pub async fn next_batch(&mut self, mut f: impl FnMut(&[u8])) -> anyhow::Result<usize> {
        let mut guard = self.fd.readable_mut().await?;
        let n = drain(guard.get_inner_mut(), &mut f);
        guard.clear_ready();
        Ok(n)
    }

    /// Hands every record already in the ring to `f` without waiting for readiness: the kernel
    /// wakes the reader only for denials, alerts and a filling buffer, so the daemon also drains
    /// on a timer (and before it judges a DNS proxy report). Returns how many were read.
    pub fn drain_now(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        drain(self.fd.get_mut(), &mut f)
    }
}

fn drain(ring: &mut RingBuf<MapData>, f: &mut impl FnMut(&[u8])) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        f(&item);
        n += 1;
    }
    n
}
