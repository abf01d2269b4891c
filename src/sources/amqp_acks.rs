//! Coalesced acks for one RabbitMQ channel: acks that are ready together go out as one
//! `basic.ack` with `multiple` when they form a run from the lowest outstanding delivery tag;
//! any other ack goes out by itself at once, so no ack waits for another message.
//!
//! The invariant: `basic.ack(tag, multiple = true)` acks every message of the channel still
//! unacked with a delivery tag up to `tag`. So a multiple ack is sent only up to a tag below
//! which every tag is either acked already or done in the same batch. A tag that is registered
//! and never acked (its message was dropped by the pipeline and is left for the broker to
//! redeliver) stays outstanding for the life of the channel: every run stops at it, and the
//! tags above it are acked one by one. A tag that lapin received but courier never registered
//! (a gap in the tags) counts as outstanding and never done, for the same reason.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

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
    /// The session is over: no ack goes out on the channel from now on.
    Close,
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

    /// Which frames ack `done`: the done tags that are the lowest outstanding ones, in a row, go
    /// in one multiple ack (when there are two or more); every other done tag by itself.
    pub(super) fn plan(&mut self, done: &BTreeSet<u64>) -> Plan {
        let mut plan = Plan::default();
        for &tag in &self.outstanding {
            if !done.contains(&tag) {
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
        for &tag in done {
            if plan.run.binary_search(&tag).is_ok() || plan.singles.contains(&tag) {
                continue;
            }
            if self.outstanding.remove(&tag) {
                plan.singles.push(tag);
            } else {
                plan.unknown.push(tag);
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
    /// Starts the task that acks on `channel`.
    pub(super) fn start(channel: Channel, stats: Arc<Stats>) -> AckTask {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(channel, stats, rx));
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

impl Drop for AckTask {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Close);
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

async fn run(channel: Channel, stats: Arc<Stats>, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut channel = Some(channel);
    let mut tags = Tags::default();
    while let Some(first) = rx.recv().await {
        // Everything ready now goes in one batch.
        let mut waiting: BTreeMap<u64, Reply> = BTreeMap::new();
        let mut close = false;
        let mut next = Some(first);
        while let Some(command) = next {
            match command {
                Command::Register(tag) => tags.register(tag),
                Command::Ack(tag, reply) => {
                    waiting.insert(tag, reply);
                }
                Command::Close => close = true,
            }
            next = rx.try_recv().ok();
        }
        if !waiting.is_empty() {
            match &channel {
                Some(channel) => send(channel, &stats, &mut tags, waiting).await,
                None => {
                    for (_, reply) in waiting {
                        let _ = reply.send(Err(CLOSED.to_string()));
                    }
                }
            }
        }
        if close {
            channel = None;
        }
    }
}

/// Sends the frames for one batch, all at once, and answers each acker with the result of the
/// frame that covered its tag.
async fn send(
    channel: &Channel,
    stats: &Stats,
    tags: &mut Tags,
    mut waiting: BTreeMap<u64, Reply>,
) {
    let done: BTreeSet<u64> = waiting.keys().copied().collect();
    let plan = tags.plan(&done);
    for tag in &plan.unknown {
        if let Some(reply) = waiting.remove(tag) {
            let _ = reply.send(Err(format!(
                "delivery tag {tag} is not outstanding on its channel"
            )));
        }
    }
    let mut frames = Vec::new();
    if let Some(last) = plan.multiple {
        let replies: Vec<Reply> = plan.run.iter().filter_map(|t| waiting.remove(t)).collect();
        frames.push((last, true, replies));
    }
    for tag in &plan.singles {
        let replies: Vec<Reply> = waiting.remove(tag).into_iter().collect();
        frames.push((*tag, false, replies));
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

    #[test]
    fn a_run_from_the_lowest_tag_is_one_multiple_ack() {
        let mut t = tags(1..=5);
        let plan = t.plan(&done(&[3, 1, 2]));
        assert_eq!(plan.multiple, Some(3));
        assert_eq!(plan.run, vec![1, 2, 3]);
        assert!(plan.singles.is_empty());
        let plan = t.plan(&done(&[4, 5]));
        assert_eq!(plan.multiple, Some(5));
        assert!(t.outstanding.is_empty());
    }

    #[test]
    fn a_done_tag_past_a_gap_is_acked_by_itself_at_once() {
        let mut t = tags(1..=6);
        let plan = t.plan(&done(&[1, 2, 4, 6]));
        assert_eq!(plan.multiple, Some(2));
        assert_eq!(plan.singles, vec![4, 6]);
        // 3 done later: alone, it is a single; 5 is still outstanding.
        let plan = t.plan(&done(&[3]));
        assert_eq!(plan.multiple, None);
        assert_eq!(plan.singles, vec![3]);
        // Now 5 is the lowest outstanding; 5 and 7 together run past the acked 6.
        t.register(7);
        let plan = t.plan(&done(&[5, 7]));
        assert_eq!(plan.multiple, Some(7));
        assert_eq!(plan.run, vec![5, 7]);
    }

    #[test]
    fn out_of_order_completion_only_coalesces_from_the_lowest() {
        let mut t = tags(1..=4);
        let plan = t.plan(&done(&[4, 3]));
        assert_eq!(
            plan.multiple, None,
            "1 is not done: no multiple ack past it"
        );
        assert_eq!(plan.singles, vec![3, 4]);
        let plan = t.plan(&done(&[2, 1]));
        assert_eq!(plan.multiple, Some(2));
    }

    #[test]
    fn a_never_acked_tag_stops_every_run_for_good() {
        let mut t = tags(1..=10);
        // 1 is dropped by the pipeline: never done.
        for batch in [[2, 3], [4, 5], [9, 10], [6, 7]] {
            let plan = t.plan(&done(&batch));
            assert_eq!(plan.multiple, None);
            assert_eq!(plan.singles, batch.to_vec());
        }
        assert_eq!(t.outstanding, done(&[1, 8]));
    }

    #[test]
    fn a_single_done_tag_is_not_a_multiple_ack() {
        let mut t = tags(1..=3);
        let plan = t.plan(&done(&[1]));
        assert_eq!(plan.multiple, None);
        assert_eq!(plan.singles, vec![1]);
    }

    #[test]
    fn an_unregistered_tag_is_never_covered_or_acked() {
        // 3 was skipped (received, never handed over): it blocks the run, and an ack of a tag
        // that is not outstanding sends nothing.
        let mut t = tags([1, 2, 4, 5]);
        let plan = t.plan(&done(&[1, 2, 4, 5]));
        assert_eq!(plan.multiple, Some(2));
        assert_eq!(plan.singles, vec![4, 5]);
        let plan = t.plan(&done(&[4, 9]));
        assert_eq!(plan.unknown, vec![4, 9]);
        assert!(plan.singles.is_empty() && plan.multiple.is_none());
        assert_eq!(t.outstanding, done(&[3]));
    }
}
