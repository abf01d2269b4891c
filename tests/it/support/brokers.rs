//! The machine's RabbitMQ and Mosquitto are shared by every test of this binary, and some tests
//! disturb them: they stop RabbitMQ (`rabbitmqctl stop_app`), close every connection of its
//! default vhost, or restart Mosquitto. Such a test must not overlap with any other test that
//! uses a broker, so every broker test holds a guard for its whole run:
//!
//! - [`brokers`]: shared, for a test that only uses the brokers (any number at once);
//! - [`brokers_exclusive`]: for a test that disturbs them (alone, once every shared holder has
//!   finished; tests that want a guard meanwhile wait behind it).
//!
//! A test takes one guard, once, at its start: taking a second would wait behind an exclusive
//! request queued in between, which waits for the first. [`assert_held`] makes forgetting it
//! fail: courier cannot be started (in-process or as a process) by a test that holds none.
//! Tests that touch no broker (configuration, CLI validation, the ack rule) take no guard.
//!
//! Other processes on the machine (another checkout's test run) are kept apart by the caller,
//! e.g. `flock /tmp/courier-brokers.lock scripts/test.sh`.

use std::cell::Cell;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static BROKERS: RwLock<()> = RwLock::const_new(());

thread_local! {
    /// Guards held by the test running on this thread (libtest runs each test on a thread of
    /// its own, and a `#[tokio::test]` body runs on that thread).
    static HELD: Cell<usize> = const { Cell::new(0) };
}

/// A test's hold on the brokers; released when dropped.
pub struct Brokers {
    _guard: Guard,
}

#[allow(dead_code)]
enum Guard {
    Shared(RwLockReadGuard<'static, ()>),
    Exclusive(RwLockWriteGuard<'static, ()>),
}

impl Brokers {
    fn new(guard: Guard) -> Brokers {
        HELD.with(|h| h.set(h.get() + 1));
        Brokers { _guard: guard }
    }
}

impl Drop for Brokers {
    fn drop(&mut self) {
        HELD.with(|h| h.set(h.get().saturating_sub(1)));
    }
}

/// Shared use of the brokers, for a test that does not disturb them.
pub async fn brokers() -> Brokers {
    Brokers::new(Guard::Shared(BROKERS.read().await))
}

/// The brokers to this test alone, for one that stops, restarts or cuts them off.
pub async fn brokers_exclusive() -> Brokers {
    Brokers::new(Guard::Exclusive(BROKERS.write().await))
}

/// Panics unless the test on this thread holds the brokers.
pub fn assert_held() {
    assert!(
        HELD.with(Cell::get) > 0,
        "this test uses a broker: take `let _brokers = support::brokers().await;` first \
         (or brokers_exclusive() if it disturbs them); see tests/it/support/brokers.rs"
    );
}
