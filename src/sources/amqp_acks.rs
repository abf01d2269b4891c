//! Coalesced acks for one RabbitMQ channel: the done messages that are the lowest outstanding
//! delivery tags, in a row, are acked at once in one `basic.ack` with `multiple`; a message done
//! while an earlier one is still in delivery waits up to `rabbitmq.ack_hold` for the earlier ones,
//! so the run reaches it and one frame acks them all, and goes by itself after that. RabbitMQ
//! spends about as much CPU on an ack frame as on the message it acks, so on a machine it
//! shares with courier, fewer frames are more events per second.
//!
//! The invariant: `basic.ack(tag, multiple = true)` acks every message of the channel still
//! unacked with a delivery tag up to `tag`. So a multiple ack is sent only up to a tag below
//! which every tag is either acked already or done in the same batch. A tag that is registered
//! and never acked (its message was dropped by the pipeline and is left for the broker to
//! redeliver) stays outstanding for the life of the channel: every run stops at it, and the
//! tags above it are acked one by one, each after its hold. A tag that lapin received but
//! courier never registered (a gap in the tags) counts as outstanding and never done, for the
//! same reason.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::BasicAckOptions;
use lapin::Channel;
use tokio::sync::{mpsc, oneshot};

use super::{AckFuture, AckHandle};
use crate::stats::Stats;

/// The error of an ack that cannot go out on its channel any more.
pub(super) const CLOSED: &str =
    "the channel closed before the ack; the broker will redeliver the message";

type Reply = oneshot::Sender<Result<(), String>>;

enum Command {
    /// A delivery was handed to the pipeline.
    Register(u64),
    /// Its message is done: ack it and answer.
    Ack(u64, Reply),
    /// The session is over: what is done is acked now, and no ack goes out on the channel
    /// after that; answers once that is done, when asked to.
    Close(Option<oneshot::Sender<()>>),
}

/// The delivery tags of one channel that may not be covered by a multiple ack.
#[derive(Debug, Default)]
pub(super) struct Tags {
    /// Registered (or skipped) and not acked, in tag order.
    outstanding: BTreeSet<u64>,
    /// The highest tag registered. Every tag up to it that is not outstanding is acked.
    last: u64,
}

/// The frames that ack one batch of done tags.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// One `multiple` ack up to this tag, covering `run`.
    pub multiple: Option<u64>,
    /// The done tags the multiple ack covers.
    pub run: Vec<u64>,
    /// Tags acked each by itself.
    pub singles: Vec<u64>,
    /// Done tags that are not outstanding (never registered, or acked already): nothing is sent.
    pub unknown: Vec<u64>,
}

impl Tags {
    /// Records a delivery handed to the pipeline. Tags come in increasing order; a tag skipped
    /// stays outstanding for good.
    pub(super) fn register(&mut self, tag: u64) {
        if tag <= self.last {
            return;
        }
        self.outstanding.extend(self.last + 1..=tag);
        self.last = tag;
    }

    /// Which frames ack the done tags in `held` (each with the time it was done): the done
    /// tags that are the lowest outstanding ones, in a row, go in one frame (a multiple ack when
    /// there are two or more); every other done tag goes by itself if it was done at or before
    /// `alone_by`, and otherwise stays held. The caller takes the planned tags out of `held`.
    pub(super) fn plan<R>(
        &mut self,
        held: &BTreeMap<u64, (R, Instant)>,
        alone_by: Instant,
    ) -> Plan {
        let mut plan = Plan::default();
        for &tag in &self.outstanding {
            if !held.contains_key(&tag) {
                break;
            }
            plan.run.push(tag);
        }
        for tag in &plan.run {
            self.outstanding.remove(tag);
        }
        if plan.run.len() == 1 {
            plan.singles.append(&mut plan.run);
        } else {
            plan.multiple = plan.run.last().copied();
        }
        for (&tag, (_, done_at)) in held {
            if plan.run.binary_search(&tag).is_ok() || plan.singles.contains(&tag) {
                continue;
            }
            if !self.outstanding.contains(&tag) {
                plan.unknown.push(tag);
            } else if *done_at <= alone_by {
                self.outstanding.remove(&tag);
                plan.singles.push(tag);
            }
        }
        plan
    }
}

/// The ack task of one channel. Dropping it closes the task: later acks fail with [`CLOSED`].
pub(super) struct AckTask {
    tx: mpsc::UnboundedSender<Command>,
}

impl AckTask {
    /// Starts the task that acks on `channel`, holding an ack above an outstanding tag for up
    /// to `hold`.
    pub(super) fn start(channel: Channel, stats: Arc<Stats>, hold: Duration) -> AckTask {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(channel, stats, hold, rx));
        AckTask { tx }
    }

    /// Registers a delivery about to be handed to the pipeline, and returns its ack handle.
    pub(super) fn register(&self, tag: u64) -> AmqpAck {
        // The task lives as long as a sender does.
        let _ = self.tx.send(Command::Register(tag));
        AmqpAck {
            tag,
            tx: self.tx.clone(),
        }
    }
}

impl AckTask {
    /// Ends the session's acks: those done go out now (not after their hold), then none does.
    /// Returns once they went out, or after `within`: the connection may close then without
    /// dropping an ack that was only waiting for its hold.
    pub(super) async fn close(self, within: Duration) {
        let (done, flushed) = oneshot::channel();
        if self.tx.send(Command::Close(Some(done))).is_ok() {
            let _ = tokio::time::timeout(within, flushed).await;
        }
    }
}

impl Drop for AckTask {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Close(None));
    }
}

/// Acks one message through its channel's task.
pub(super) struct AmqpAck {
    tag: u64,
    tx: mpsc::UnboundedSender<Command>,
}

impl AckHandle for AmqpAck {
    fn ack(self: Box<Self>) -> AckFuture {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            if self.tx.send(Command::Ack(self.tag, reply)).is_err() {
                return Err(CLOSED.to_string());
            }
            answer.await.unwrap_or_else(|_| Err(CLOSED.to_string()))
        })
    }
}

/// A done tag waiting for its frame: who to answer, and when it was done.
type Held = BTreeMap<u64, (Reply, Instant)>;

async fn run(
    channel: Channel,
    stats: Arc<Stats>,
    hold: Duration,
    mut rx: mpsc::UnboundedReceiver<Command>,
) {
    let mut channel = Some(channel);
    let mut tags = Tags::default();
    // Every held tag is above an outstanding one that is not done: a run from the lowest
    // outstanding tag goes out in the batch that completes it.
    let mut held = Held::new();
    loop {
        let first_done = held.values().map(|(_, done_at)| *done_at).min();
        let first = tokio::select! {
            command = rx.recv() => match command {
                Some(command) => Some(command),
                None => break,
            },
            _ = hold_expires(first_done, hold) => None,
        };
        // Everything ready now goes in one batch.
        let mut close = false;
        let mut closed_tell = Vec::new();
        let mut next = first;
        while let Some(command) = next {
            match command {
                Command::Register(tag) => tags.register(tag),
                Command::Ack(tag, reply) => {
                    held.insert(tag, (reply, Instant::now()));
                }
                Command::Close(tell) => {
                    close = true;
                    closed_tell.extend(tell);
                }
            }
            next = rx.try_recv().ok();
        }
        let Some(open) = &channel else {
            answer_closed(&mut held);
            for tell in closed_tell {
                let _ = tell.send(());
            }
            continue;
        };
        // At the close, nothing waits any more: what is done is acked while the channel is open.
        let now = Instant::now();
        let alone_by = if close {
            now
        } else {
            now.checked_sub(hold).unwrap_or(now)
        };
        if !held.is_empty() {
            send(open, &stats, &mut tags, &mut held, alone_by).await;
        }
        if close {
            channel = None;
            answer_closed(&mut held);
            for tell in closed_tell {
                let _ = tell.send(());
            }
        }
    }
}

/// Resolves when the tag done first at `first_done` has been held for `hold`; never when none is.
async fn hold_expires(first_done: Option<Instant>, hold: Duration) {
    match first_done {
        Some(at) => tokio::time::sleep_until((at + hold).into()).await,
        None => std::future::pending().await,
    }
}

fn answer_closed(held: &mut Held) {
    for (_, (reply, _)) in std::mem::take(held) {
        let _ = reply.send(Err(CLOSED.to_string()));
    }
}

/// Sends the frames for the held tags that are ready, all at once, and answers each acker with
/// the result of the frame that covered its tag.
async fn send(
    channel: &Channel,
    stats: &Stats,
    tags: &mut Tags,
    held: &mut Held,
    alone_by: Instant,
) {
    let plan = tags.plan(held, alone_by);
    for tag in &plan.unknown {
        if let Some((reply, _)) = held.remove(tag) {
            let _ = reply.send(Err(format!(
                "delivery tag {tag} is not outstanding on its channel"
            )));
        }
    }
    let mut take = |tag: &u64| held.remove(tag).map(|(reply, _)| reply);
    let mut frames = Vec::new();
    if let Some(last) = plan.multiple {
        let replies: Vec<Reply> = plan.run.iter().filter_map(&mut take).collect();
        frames.push((last, true, replies));
    }
    for tag in &plan.singles {
        let replies: Vec<Reply> = take(tag).into_iter().collect();
        frames.push((*tag, false, replies));
    }
    if frames.is_empty() {
        return;
    }
    let results = futures_util::future::join_all(
        frames
            .iter()
            .map(|&(tag, multiple, _)| ack_frame(channel, stats, tag, multiple)),
    )
    .await;
    for ((_, _, replies), result) in frames.into_iter().zip(results) {
        for reply in replies {
            let _ = reply.send(result.clone());
        }
    }
}

async fn ack_frame(
    channel: &Channel,
    stats: &Stats,
    tag: u64,
    multiple: bool,
) -> Result<(), String> {
    if !channel.status().connected() {
        return Err(CLOSED.to_string());
    }
    Stats::inc(&stats.amqp_ack_frames);
    channel
        .basic_ack(tag, BasicAckOptions { multiple })
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(registered: impl IntoIterator<Item = u64>) -> Tags {
        let mut tags = Tags::default();
        for tag in registered {
            tags.register(tag);
        }
        tags
    }

    fn done(tags: &[u64]) -> BTreeSet<u64> {
        tags.iter().copied().collect()
    }

    /// `done`, each done at `at`.
    fn held(done: &[u64], at: Instant) -> BTreeMap<u64, ((), Instant)> {
        done.iter().map(|&tag| (tag, ((), at))).collect()
    }

    /// The plan for `done` when no tag waits any more (a hold of zero).
    fn at_once(t: &mut Tags, done: &[u64]) -> Plan {
        let now = Instant::now();
        t.plan(&held(done, now), now)
    }

    #[test]
    fn a_run_from_the_lowest_tag_is_one_multiple_ack() {
        let mut t = tags(1..=5);
        let plan = at_once(&mut t, &[3, 1, 2]);
        assert_eq!(plan.multiple, Some(3));
        assert_eq!(plan.run, vec![1, 2, 3]);
        assert!(plan.singles.is_empty());
        let plan = at_once(&mut t, &[4, 5]);
        assert_eq!(plan.multiple, Some(5));
        assert!(t.outstanding.is_empty());
    }

    #[test]
    fn a_done_tag_past_a_gap_is_acked_by_itself_once_its_hold_is_over() {
        let mut t = tags(1..=6);
        let plan = at_once(&mut t, &[1, 2, 4, 6]);
        assert_eq!(plan.multiple, Some(2));
        assert_eq!(plan.singles, vec![4, 6]);
        // 3 done later: alone, it is a single; 5 is still outstanding.
        let plan = at_once(&mut t, &[3]);
        assert_eq!(plan.multiple, None);
        assert_eq!(plan.singles, vec![3]);
        // Now 5 is the lowest outstanding; 5 and 7 together run past the acked 6.
        t.register(7);
        let plan = at_once(&mut t, &[5, 7]);
        assert_eq!(plan.multiple, Some(7));
        assert_eq!(plan.run, vec![5, 7]);
    }

    #[test]
    fn a_done_tag_past_a_gap_waits_for_the_run_within_its_hold() {
        let mut t = tags(1..=4);
        let done_at = Instant::now();
        let before = done_at - Duration::from_millis(1);
        let plan = t.plan(&held(&[2, 3, 4], done_at), before);
        assert_eq!(plan, Plan::default(), "held: nothing is sent yet");
        assert_eq!(t.outstanding, done(&[1, 2, 3, 4]));
        // 1 is done: one multiple ack covers it and the three that waited.
        let plan = t.plan(&held(&[1, 2, 3, 4], done_at), before);
        assert_eq!(plan.multiple, Some(4));
        assert_eq!(plan.run, vec![1, 2, 3, 4]);
        assert!(plan.singles.is_empty() && t.outstanding.is_empty());
    }

    #[test]
    fn only_the_tags_held_past_their_hold_go_by_themselves() {
        let mut t = tags(1..=5);
        let early = Instant::now();
        let late = early + Duration::from_millis(10);
        let mut done = held(&[3], early);
        done.extend(held(&[5], late));
        let plan = t.plan(&done, early + Duration::from_millis(5));
        assert_eq!(plan.multiple, None);
        assert_eq!(plan.singles, vec![3]);
        assert_eq!(t.outstanding, self::done(&[1, 2, 4, 5]));
    }

    #[test]
    fn out_of_order_completion_only_coalesces_from_the_lowest() {
        let mut t = tags(1..=4);
        let plan = at_once(&mut t, &[4, 3]);
        assert_eq!(
            plan.multiple, None,
            "1 is not done: no multiple ack past it"
        );
        assert_eq!(plan.singles, vec![3, 4]);
        let plan = at_once(&mut t, &[2, 1]);
        assert_eq!(plan.multiple, Some(2));
    }

    #[test]
    fn a_never_acked_tag_stops_every_run_for_good() {
        let mut t = tags(1..=10);
        // 1 is dropped by the pipeline: never done.
        for batch in [[2, 3], [4, 5], [9, 10], [6, 7]] {
            let plan = at_once(&mut t, &batch);
            assert_eq!(plan.multiple, None);
            assert_eq!(plan.singles, batch.to_vec());
        }
        assert_eq!(t.outstanding, done(&[1, 8]));
    }

    #[test]
    fn a_single_done_tag_is_not_a_multiple_ack() {
        let mut t = tags(1..=3);
        let plan = at_once(&mut t, &[1]);
        assert_eq!(plan.multiple, None);
        assert_eq!(plan.singles, vec![1]);
    }

    #[test]
    fn an_unregistered_tag_is_never_covered_or_acked() {
        // 3 was skipped (received, never handed over): it blocks the run, and an ack of a tag
        // that is not outstanding sends nothing.
        let mut t = tags([1, 2, 4, 5]);
        let plan = at_once(&mut t, &[1, 2, 4, 5]);
        assert_eq!(plan.multiple, Some(2));
        assert_eq!(plan.singles, vec![4, 5]);
        let plan = at_once(&mut t, &[4, 9]);
        assert_eq!(plan.unknown, vec![4, 9]);
        assert!(plan.singles.is_empty() && plan.multiple.is_none());
        assert_eq!(t.outstanding, done(&[3]));
    }
}
