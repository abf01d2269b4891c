//! The graceful stop, as one value every long-running task holds a clone of.
//!
//! A stop has two moments, and each task waits for the one that concerns it:
//! 1. **requested** (SIGINT, SIGTERM, or the embedding caller): the sources stop taking messages,
//!    the retry scheduler starts no new attempt, the admin port closes, and the pipeline drains
//!    what it holds;
//! 2. **drained**: every message taken is acked or abandoned, so the sources may close their
//!    connections (closing earlier would turn the last acks into redeliveries).

use tokio_util::sync::CancellationToken;

/// A graceful stop of one [`crate::run`]. Cloning it is cheap; every clone sees the same stop.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    requested: CancellationToken,
    drained: CancellationToken,
}

impl Shutdown {
    /// A stop that has not been requested yet.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Asks courier to stop: finish what is under way, take nothing new.
    pub fn request(&self) {
        self.requested.cancel();
    }

    /// Whether the stop was requested.
    pub fn is_requested(&self) -> bool {
        self.requested.is_cancelled()
    }

    /// Returns once the stop is requested.
    pub async fn requested(&self) {
        self.requested.cancelled().await
    }

    /// A stop of its own for one part (a source that a configuration reload replaces), which
    /// the whole stop reaches too.
    pub(crate) fn child(&self) -> Shutdown {
        Shutdown {
            requested: self.requested.child_token(),
            drained: self.drained.child_token(),
        }
    }

    /// Every message taken is acked or abandoned. Also counts as the request, so that nothing
    /// waits for a request after the drain.
    pub(crate) fn mark_drained(&self) {
        self.requested.cancel();
        self.drained.cancel();
    }

    /// Returns once every message taken is acked or abandoned.
    pub async fn drained(&self) {
        self.drained.cancelled().await
    }
}
