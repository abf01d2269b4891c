//! Which of a source's broker URLs to connect to next (`url`, or the nodes of `urls`), and how
//! long to wait first. Each failure moves to the next URL; the URLs of one round are tried one
//! after the other without a pause, and only a round in which every URL failed waits, with a
//! capped exponential backoff. A connection that lasted [`STABLE`] starts a new round from where
//! it is; one lost sooner counts as a failure of its round, so that a broker that accepts and
//! then drops every connection is not hammered without a pause.

use std::time::{Duration, Instant};

use crate::backoff::ReconnectBackoff;

/// How long a connection must have lasted for its loss to start a new round.
pub const STABLE: Duration = Duration::from_secs(10);

/// The reconnect state of one source.
pub struct Failover {
    count: usize,
    current: usize,
    failed_in_round: usize,
    backoff: ReconnectBackoff,
    /// When the connection now up was made.
    connected_at: Option<Instant>,
}

impl Failover {
    /// `count` URLs (at least one), waiting 200 ms up to 30 s between failed rounds.
    pub fn new(count: usize) -> Failover {
        Failover {
            count: count.max(1),
            current: 0,
            failed_in_round: 0,
            backoff: ReconnectBackoff::new(Duration::from_millis(200), Duration::from_secs(30)),
            connected_at: None,
        }
    }

    /// The index of the URL to connect to now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// After a failed or lost connection: moves to the next URL and returns how long to wait
    /// before trying it (nothing until every URL of the round has failed).
    pub fn failed(&mut self) -> Duration {
        self.failed_at(Instant::now())
    }

    fn failed_at(&mut self, now: Instant) -> Duration {
        if let Some(at) = self.connected_at.take() {
            if now.duration_since(at) >= STABLE {
                self.failed_in_round = 0;
                self.backoff.reset();
            }
        }
        self.current = (self.current + 1) % self.count;
        self.failed_in_round += 1;
        if self.failed_in_round < self.count {
            return Duration::ZERO;
        }
        self.failed_in_round = 0;
        self.backoff.next_delay()
    }

    /// A connection worked: once it has lasted [`STABLE`], its loss starts a new round with
    /// the backoff from its start.
    pub fn connected(&mut self) {
        self.connected_at = Some(Instant::now());
    }

    #[cfg(test)]
    fn connected_at(&mut self, at: Instant) {
        self.connected_at = Some(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_url_in_turn_then_a_pause() {
        let mut f = Failover::new(3);
        assert_eq!(f.current(), 0);
        assert_eq!(f.failed(), Duration::ZERO);
        assert_eq!(f.current(), 1);
        assert_eq!(f.failed(), Duration::ZERO);
        assert_eq!(f.current(), 2);
        let pause = f.failed();
        assert!(pause > Duration::ZERO, "a whole round failed");
        assert_eq!(f.current(), 0);
        // Connected to node 0 for a while, then lost: node 1 is tried at once.
        let now = Instant::now();
        f.connected_at(now - STABLE);
        assert_eq!(f.failed_at(now), Duration::ZERO);
        assert_eq!(f.current(), 1);
    }

    /// A node that takes the connection and drops it at once is a failure of its round: the
    /// round ends in a pause, and the pauses grow.
    #[test]
    fn connections_lost_at_once_do_not_restart_the_round() {
        let mut f = Failover::new(2);
        let now = Instant::now();
        let mut pauses = Vec::new();
        for _ in 0..6 {
            f.connected_at(now);
            pauses.push(f.failed_at(now + Duration::from_millis(50)));
        }
        assert_eq!(pauses[0], Duration::ZERO);
        assert!(
            pauses[1] > Duration::ZERO,
            "a whole round failed: {pauses:?}"
        );
        assert_eq!(pauses[2], Duration::ZERO);
        assert!(pauses[5] > pauses[1], "the backoff grows: {pauses:?}");
    }

    #[test]
    fn one_url_waits_after_every_failure() {
        let mut f = Failover::new(1);
        assert!(f.failed() > Duration::ZERO);
        assert_eq!(f.current(), 0);
    }
}
