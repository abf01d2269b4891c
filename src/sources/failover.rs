//! Which of a source's broker URLs to connect to next (`url`, or the nodes of `urls`), and how
//! long to wait first. Each failure moves to the next URL; the URLs of one round are tried one
//! after the other without a pause, and only a round in which every URL failed waits, with a
//! capped exponential backoff. A connection that worked starts a new round from where it is.

use std::time::Duration;

use crate::backoff::ReconnectBackoff;

/// The reconnect state of one source.
pub struct Failover {
    count: usize,
    current: usize,
    failed_in_round: usize,
    backoff: ReconnectBackoff,
}

impl Failover {
    /// `count` URLs (at least one), waiting 200 ms up to 30 s between failed rounds.
    pub fn new(count: usize) -> Failover {
        Failover {
            count: count.max(1),
            current: 0,
            failed_in_round: 0,
            backoff: ReconnectBackoff::new(Duration::from_millis(200), Duration::from_secs(30)),
        }
    }

    /// The index of the URL to connect to now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// After a failed or lost connection: moves to the next URL and returns how long to wait
    /// before trying it (nothing until every URL of the round has failed).
    pub fn failed(&mut self) -> Duration {
        self.current = (self.current + 1) % self.count;
        self.failed_in_round += 1;
        if self.failed_in_round < self.count {
            return Duration::ZERO;
        }
        self.failed_in_round = 0;
        self.backoff.next_delay()
    }

    /// A connection worked: the backoff starts over.
    pub fn connected(&mut self) {
        self.failed_in_round = 0;
        self.backoff.reset();
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
        // Connected to node 0, then lost: node 1 is tried at once.
        f.connected();
        assert_eq!(f.failed(), Duration::ZERO);
        assert_eq!(f.current(), 1);
    }

    #[test]
    fn one_url_waits_after_every_failure() {
        let mut f = Failover::new(1);
        assert!(f.failed() > Duration::ZERO);
        assert_eq!(f.current(), 0);
    }
}
